# logd server image: slim Python, non-root, data in a volume.

# Build stage: the wheel, with logd/_hot.c compiled (the slim image has no compiler).
FROM python:3.11-slim AS build
RUN apt-get update \
    && apt-get install -y --no-install-recommends gcc libc6-dev \
    && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY pyproject.toml README.md protocol.md ./
COPY logd ./logd
RUN pip wheel --no-cache-dir --no-deps --wheel-dir /wheels .

FROM python:3.11-slim
RUN useradd --system --uid 1774 --home-dir /var/lib/logd --create-home logd
COPY --from=build /wheels /wheels
# The import check fails the build if the C module did not make it into the wheel.
RUN pip install --no-cache-dir /wheels/*.whl && rm -rf /wheels /root/.cache \
    && python -c "import logd._hot"

USER logd
WORKDIR /var/lib/logd
VOLUME ["/var/lib/logd"]
# It listens on every interface, so it wants tokens (protected mode): from a secret
# mounted at /run/secrets/logd_auth, or the file LOGD_AUTH_FILE names (README).
ENV LOGD_DATA_DIR=/var/lib/logd/data \
    LOGD_LOG_FORMAT=json \
    LOGD_AUTH_FILE=/run/secrets/logd_auth
EXPOSE 1774

# PING over a raw socket: no extra tools needed in the image.
HEALTHCHECK --interval=10s --timeout=3s --start-period=5s --retries=3 \
    CMD ["python", "-c", "import socket,sys; s=socket.create_connection(('127.0.0.1',1774),2); s.sendall(b'PING\\r\\n'); sys.exit(0 if s.recv(16).startswith(b'PONG') else 1)"]

ENTRYPOINT ["logd", "serve", "--host", "0.0.0.0"]
