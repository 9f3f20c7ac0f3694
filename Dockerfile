# logd server image: non-root, data in a volume, every setting a LOGD_* variable.
#
# BASE: any Debian bookworm with python3 (3.11) and its venv module. The
# default is the official slim Python image; where no registry answers, make
# one from Debian's packages (.ci/docker does: mmdebstrap + docker import) and
# pass it with --build-arg BASE=NAME. Builds with BuildKit or the classic
# builder (Debian's docker.io 20.10 uses the classic one).
ARG BASE=python:3.11-slim

# Build stage: a virtualenv holding logd, with logd/_hot.c compiled (the final
# image gets the virtualenv and no compiler). Python's headers come with the
# slim image; Debian's own python3 needs python3-dev for them.
FROM ${BASE} AS build
RUN set -eu; \
    headers=$(python3 -c 'import sysconfig; print(sysconfig.get_paths()["include"])'); \
    dev=; [ -e "$headers/Python.h" ] || dev=python3-dev; \
    apt-get update -qq; \
    apt-get install -y -qq --no-install-recommends gcc libc6-dev $dev >/dev/null; \
    rm -rf /var/lib/apt/lists/*
WORKDIR /src
# pip-ca.pe[m]: where TLS to the package index is intercepted, the CA bundle pip
# must trust (cp /etc/ssl/certs/ca-certificates.crt pip-ca.pem before building).
# Optional, hence the pattern, which matches nothing without it. Only this stage
# has it: the final image takes the virtualenv alone.
COPY pyproject.toml README.md protocol.md pip-ca.pe[m] ./
COPY logd ./logd
# The import check (run outside /src, whose logd/ has no .so) fails the build
# if the C module did not make it into the install.
RUN set -eu; \
    if [ -s pip-ca.pem ]; then export PIP_CERT=/src/pip-ca.pem; fi; \
    python3 -m venv /opt/logd; \
    /opt/logd/bin/pip install --quiet --no-cache-dir --disable-pip-version-check /src; \
    cd / && /opt/logd/bin/python -c "import logd._hot"

FROM ${BASE}
# uid 1774 (logd's port), fixed so that a volume or secret can be given to it.
RUN groupadd --gid 1774 logd \
    && useradd --uid 1774 --gid 1774 --home-dir /var/lib/logd --create-home --shell /usr/sbin/nologin logd
COPY --from=build /opt/logd /opt/logd
ENV PATH=/opt/logd/bin:$PATH

USER logd
WORKDIR /var/lib/logd
VOLUME ["/var/lib/logd"]
# Settings as variables, not flags, so that the health check (logd ping
# --local) reads the same ones as the server: give yours with -e LOGD_...
# It listens on every interface, so it wants tokens (protected mode): from a
# secret mounted at /run/secrets/logd_auth, or the file LOGD_AUTH_FILE names
# (README, "Docker").
ENV LOGD_HOST=0.0.0.0 \
    LOGD_DATA_DIR=/var/lib/logd/data \
    LOGD_LOG_FORMAT=json \
    LOGD_AUTH_FILE=/run/secrets/logd_auth
EXPOSE 1774

# PING to the server these variables describe: 127.0.0.1 and LOGD_PORT, over
# TLS when LOGD_TLS_CERT is set (README, "Docker").
HEALTHCHECK --interval=10s --timeout=10s --start-period=10s --retries=3 \
    CMD ["logd", "ping", "--local", "--timeout", "5"]

# The image is the logd command: `docker run IMAGE` serves, `docker run IMAGE token add ...`
# manages an auth file, `docker run IMAGE check /var/lib/logd/data` checks a stopped server's log.
ENTRYPOINT ["logd"]
CMD ["serve"]
