/*
 * fanin: the benchmark's load generator for write round trips, in C.
 *
 * N connections to one server, each keeping DEPTH copies of one pre-encoded
 * command in flight (DEPTH 1: one round trip at a time). One thread, one
 * epoll loop, non-blocking sockets. Like bench/loadgen.py it never parses a
 * reply: every reply is a known number of lines and no payload holds CR or
 * LF, so counting '\n' in what arrives counts replies exactly (a chunk
 * holding "ERR" is a failure). A latency sample is taken per command, from
 * the moment it is queued for sending to the arrival of its last reply line.
 *
 * Why C: one Python thread driving 50 connections spent as much CPU per
 * message as the server and became the limit (issue 12). This loop costs a
 * few hundred nanoseconds of user time per message, so the server is.
 *
 * Phases: a warm-up (not measured), a pause until every reply is in, then
 * the measured run. "measuring" is printed on stdout when it starts (the
 * caller samples the server's CPU then), and one JSON object when it ends.
 * Bounded by a message count and a deadline; a server that stops answering
 * fails the run after --timeout seconds. Latencies (int64 ns, native byte
 * order) go to the --latencies file.
 *
 *   fanin --host 127.0.0.1 --port P --command FILE --lines L [--conns N]
 *         [--depth D] [--per-command M] [--warmup S] [--seconds S]
 *         [--max-commands N] [--timeout S] [--latencies FILE]
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <getopt.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#define RECV_BYTES 65536

struct conn {
    int fd;
    long pending_lines;  /* reply lines received towards the next reply */
    long in_flight;      /* commands sent (or queued) and not yet answered */
    long out_left;       /* bytes queued but not yet written */
    long out_pos;        /* where in the repeated command the next byte is */
    int64_t *sent_at;    /* ring of send times, one per command in flight */
    long head, tail;     /* ring indexes: oldest, next free */
    int want_out;        /* registered for EPOLLOUT */
};

static struct {
    const char *host;
    int port;
    const char *command_path;
    const char *latency_path;
    long lines, conns, depth, per_command;
    double warmup, seconds, timeout;
    long max_commands;
} opt = {"127.0.0.1", 0, NULL, NULL, 1, 1, 1, 1, 0.0, 1.0, 30.0, 1L << 40};

static unsigned char *block; /* the command repeated depth + 1 times */
static long cmd_len;
static int ep;
static struct conn *conns;
static int64_t *lat;
static long lat_n, lat_cap;
static int measuring; /* record latencies only in the measured phase */

static void fail(const char *fmt, ...) {
    char msg[512];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(msg, sizeof msg, fmt, ap);
    va_end(ap);
    printf("{\"error\": \"");
    for (char *p = msg; *p; p++) { /* a JSON string: escape what needs it */
        if (*p == '"' || *p == '\\') putchar('\\');
        putchar((unsigned char)*p < 0x20 ? ' ' : *p);
    }
    printf("\"}\n");
    exit(1);
}

static int64_t now_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000000000 + ts.tv_nsec;
}

static double cpu_s(double *user, double *sys) {
    struct rusage ru;
    getrusage(RUSAGE_SELF, &ru);
    *user = ru.ru_utime.tv_sec + ru.ru_utime.tv_usec / 1e6;
    *sys = ru.ru_stime.tv_sec + ru.ru_stime.tv_usec / 1e6;
    return *user + *sys;
}

static void read_command(void) {
    FILE *f = fopen(opt.command_path, "rb");
    if (!f) fail("cannot open %s: %s", opt.command_path, strerror(errno));
    unsigned char *cmd = malloc(1 << 20);
    cmd_len = (long)fread(cmd, 1, 1 << 20, f);
    fclose(f);
    if (cmd_len <= 0) fail("empty command file %s", opt.command_path);
    block = malloc((size_t)cmd_len * (size_t)(opt.depth + 1));
    if (!block) fail("out of memory");
    for (long i = 0; i <= opt.depth; i++) memcpy(block + i * cmd_len, cmd, (size_t)cmd_len);
    free(cmd);
}

static void watch(struct conn *c, int out) {
    struct epoll_event ev = {.events = EPOLLIN | (out ? EPOLLOUT : 0), .data.ptr = c};
    if (epoll_ctl(ep, EPOLL_CTL_MOD, c->fd, &ev) < 0) fail("epoll_ctl: %s", strerror(errno));
    c->want_out = out;
}

/* Write what is queued; wait for EPOLLOUT if the socket buffer is full. */
static void flush_out(struct conn *c) {
    while (c->out_left > 0) {
        long off = c->out_pos % cmd_len;
        long room = (opt.depth + 1) * cmd_len - off;
        ssize_t n = send(c->fd, block + off, (size_t)(c->out_left < room ? c->out_left : room), MSG_NOSIGNAL);
        if (n < 0) {
            if (errno == EAGAIN || errno == EWOULDBLOCK) break;
            if (errno == EINTR) continue;
            fail("send: %s", strerror(errno));
        }
        c->out_left -= n;
        c->out_pos += n;
    }
    if ((c->out_left > 0) != c->want_out) watch(c, c->out_left > 0);
}

static void queue_commands(struct conn *c, long k, int64_t t) {
    for (long i = 0; i < k; i++) {
        c->sent_at[c->tail] = t;
        c->tail = (c->tail + 1) % opt.depth;
    }
    c->in_flight += k;
    c->out_left += k * cmd_len;
}

static void record(int64_t ns) {
    if (lat_n == lat_cap) {
        lat_cap = lat_cap ? 2 * lat_cap : 1 << 16;
        lat = realloc(lat, (size_t)lat_cap * sizeof *lat);
        if (!lat) fail("out of memory for latencies");
    }
    lat[lat_n++] = ns;
}

/*
 * One phase: fill every connection to DEPTH, then keep it full until `end`
 * or `max_cmds` commands were sent, and wait for every reply. Returns the
 * commands answered; *t_last is when the last reply arrived.
 */
static long run_phase(int64_t end, long max_cmds, int64_t *t_last) {
    static unsigned char buf[RECV_BYTES];
    struct epoll_event events[256];
    long sent = 0, done = 0, outstanding = 0;
    int64_t t = now_ns();
    int64_t idle_limit = (int64_t)(opt.timeout * 1e9);
    int64_t last_progress = t;
    *t_last = t;
    for (long i = 0; i < opt.conns; i++) {
        long k = opt.depth;
        if (k > max_cmds - sent) k = max_cmds - sent;
        if (k <= 0) break;
        queue_commands(&conns[i], k, now_ns());
        flush_out(&conns[i]);
        sent += k;
        outstanding += k;
    }
    while (outstanding > 0) {
        int n = epoll_wait(ep, events, 256, 1000);
        if (n < 0) {
            if (errno == EINTR) continue;
            fail("epoll_wait: %s", strerror(errno));
        }
        t = now_ns();
        if (n == 0 && t - last_progress > idle_limit)
            fail("%ld replies never came (no answer for %.0f s)", outstanding, opt.timeout);
        for (int e = 0; e < n; e++) {
            struct conn *c = events[e].data.ptr;
            if (events[e].events & EPOLLOUT) flush_out(c);
            if (!(events[e].events & (EPOLLIN | EPOLLERR | EPOLLHUP))) continue;
            ssize_t got = recv(c->fd, buf, sizeof buf, 0);
            if (got < 0) {
                if (errno == EAGAIN || errno == EWOULDBLOCK || errno == EINTR) continue;
                fail("recv: %s", strerror(errno));
            }
            if (got == 0) fail("the server closed a connection");
            if (memmem(buf, (size_t)got, "ERR", 3))
                fail("server error reply: %.*s", (int)(got < 200 ? got : 200), buf);
            long nl = 0;
            for (unsigned char *p = buf, *stop = buf + got; (p = memchr(p, '\n', (size_t)(stop - p))); p++) nl++;
            c->pending_lines += nl;
            long replies = c->pending_lines / opt.lines;
            if (!replies) continue;
            if (replies > c->in_flight) fail("more replies than commands: %.*s", (int)(got < 200 ? got : 200), buf);
            c->pending_lines -= replies * opt.lines;
            t = now_ns();
            last_progress = t;
            *t_last = t;
            for (long r = 0; r < replies; r++) {
                if (measuring) record(t - c->sent_at[c->head]);
                c->head = (c->head + 1) % opt.depth;
            }
            c->in_flight -= replies;
            done += replies;
            outstanding -= replies;
            if (t < end && sent < max_cmds) { /* as many new commands as were answered */
                long k = replies;
                if (k > max_cmds - sent) k = max_cmds - sent;
                queue_commands(c, k, t);
                flush_out(c);
                sent += k;
                outstanding += k;
            }
        }
    }
    return done;
}

static void parse_args(int argc, char **argv) {
    static struct option longs[] = {
        {"host", required_argument, 0, 'h'},        {"port", required_argument, 0, 'p'},
        {"command", required_argument, 0, 'c'},     {"lines", required_argument, 0, 'l'},
        {"conns", required_argument, 0, 'n'},       {"depth", required_argument, 0, 'd'},
        {"per-command", required_argument, 0, 'm'}, {"warmup", required_argument, 0, 'w'},
        {"seconds", required_argument, 0, 's'},     {"max-commands", required_argument, 0, 'x'},
        {"timeout", required_argument, 0, 't'},     {"latencies", required_argument, 0, 'L'},
        {0, 0, 0, 0},
    };
    int ch;
    while ((ch = getopt_long(argc, argv, "", longs, NULL)) != -1) {
        switch (ch) {
        case 'h': opt.host = optarg; break;
        case 'p': opt.port = atoi(optarg); break;
        case 'c': opt.command_path = optarg; break;
        case 'l': opt.lines = atol(optarg); break;
        case 'n': opt.conns = atol(optarg); break;
        case 'd': opt.depth = atol(optarg); break;
        case 'm': opt.per_command = atol(optarg); break;
        case 'w': opt.warmup = atof(optarg); break;
        case 's': opt.seconds = atof(optarg); break;
        case 'x': opt.max_commands = atol(optarg); break;
        case 't': opt.timeout = atof(optarg); break;
        case 'L': opt.latency_path = optarg; break;
        default: fail("bad arguments (see the comment at the top of bench/fanin.c)");
        }
    }
    if (opt.port <= 0 || !opt.command_path || opt.lines < 1 || opt.conns < 1 || opt.depth < 1 ||
        opt.per_command < 1 || opt.seconds <= 0 || opt.warmup < 0 || opt.max_commands < 1 || opt.timeout <= 0)
        fail("need --port, --command and positive --lines, --conns, --depth, --per-command, --seconds");
}

static void connect_all(void) {
    struct sockaddr_in addr = {.sin_family = AF_INET, .sin_port = htons((uint16_t)opt.port)};
    if (inet_pton(AF_INET, opt.host, &addr.sin_addr) != 1) fail("bad host %s", opt.host);
    ep = epoll_create1(0);
    if (ep < 0) fail("epoll_create1: %s", strerror(errno));
    conns = calloc((size_t)opt.conns, sizeof *conns);
    if (!conns) fail("out of memory");
    for (long i = 0; i < opt.conns; i++) {
        struct conn *c = &conns[i];
        c->fd = socket(AF_INET, SOCK_STREAM, 0);
        if (c->fd < 0) fail("socket: %s", strerror(errno));
        int one = 1;
        setsockopt(c->fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
        /* Connected while blocking (set-up, not measured), then non-blocking. */
        if (connect(c->fd, (struct sockaddr *)&addr, sizeof addr) < 0)
            fail("connect to %s:%d: %s", opt.host, opt.port, strerror(errno));
        if (fcntl(c->fd, F_SETFL, fcntl(c->fd, F_GETFL) | O_NONBLOCK) < 0) fail("fcntl: %s", strerror(errno));
        c->sent_at = calloc((size_t)opt.depth, sizeof *c->sent_at);
        if (!c->sent_at) fail("out of memory");
        struct epoll_event ev = {.events = EPOLLIN, .data.ptr = c};
        if (epoll_ctl(ep, EPOLL_CTL_ADD, c->fd, &ev) < 0) fail("epoll_ctl: %s", strerror(errno));
    }
}

int main(int argc, char **argv) {
    parse_args(argc, argv);
    read_command();
    connect_all();
    int64_t t_last;
    long warm = 0;
    if (opt.warmup > 0) {
        long cap = opt.max_commands / 10 > opt.conns * opt.depth ? opt.max_commands / 10 : opt.conns * opt.depth;
        warm = run_phase(now_ns() + (int64_t)(opt.warmup * 1e9), cap, &t_last);
    }
    printf("measuring\n");
    fflush(stdout);
    double u0, s0, u1, s1;
    cpu_s(&u0, &s0);
    measuring = 1;
    int64_t t0 = now_ns();
    long done = run_phase(t0 + (int64_t)(opt.seconds * 1e9), opt.max_commands, &t_last);
    cpu_s(&u1, &s1);
    if (opt.latency_path) {
        FILE *f = fopen(opt.latency_path, "wb");
        if (!f || fwrite(lat, sizeof *lat, (size_t)lat_n, f) != (size_t)lat_n || fclose(f) != 0)
            fail("cannot write %s: %s", opt.latency_path, strerror(errno));
    }
    printf("{\"generator\": \"c\", \"connections\": %ld, \"depth\": %ld, \"commands\": %ld, "
           "\"messages\": %ld, \"warmup_messages\": %ld, \"seconds\": %.6f, \"cpu_user_s\": %.4f, "
           "\"cpu_sys_s\": %.4f, \"latency_samples\": %ld}\n",
           opt.conns, opt.depth, done, done * opt.per_command, warm * opt.per_command, (t_last - t0) / 1e9,
           u1 - u0, s1 - s0, lat_n);
    for (long i = 0; i < opt.conns; i++) close(conns[i].fd);
    return 0;
}
