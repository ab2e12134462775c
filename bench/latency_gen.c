/* latency_gen: an open-loop HTTP/1.1 load generator for bench/latency.py and
 * bench/scale.py (built by bench/latency_build.py with `cc -O2`).
 *
 * Open loop: request i is *due* at t0 + i/rate whatever happened before it; it is
 * sent on a free keep-alive connection as soon as one exists, and its latency is
 * measured from when it was due (not from when it could be sent), so a proxy that
 * stalls is charged for every request the stall delayed: no coordinated omission.
 * The time from the actual send is kept too ("service time", what a closed-loop
 * tool such as h2load --rps reports).
 *
 * Phases: ramp (open --connections active and --idle idle connections, at most
 * --connect-rate per second; each idle one sends one request, reads the answer and
 * then stays silent), [--wait-go: print "ready {...}" and wait for a line on stdin],
 * measure (--skip s unrecorded, then --duration s, at --rate req/s over the active
 * connections, in FIFO order so that each is used alike), drain (wait up to --drain s for responses in flight),
 * [--probe-idle: one more request on every idle connection, paced like the ramp],
 * then print one JSON line and, with --wait-go, wait for stdin to close before closing
 * the connections (so that the caller can look at the proxy with them all open).
 *
 * Sources: --source 127.0.0.A-B binds each connection to one of those addresses in
 * turn (IP_BIND_ADDRESS_NO_PORT, so ports are picked per 4-tuple at connect): each
 * source address has the whole ephemeral port range to itself.
 *
 * --tick-us T: never sleep less than T µs while requests are due later (default 0:
 * wake for each one; a tick batches sends and adds up to T to every latency).
 *
 * Responses must carry Content-Length (or be 204/304); chunked bodies count as parse
 * errors.  --raw PATH writes each measured latency (µs, uint32, native order).
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/epoll.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#ifndef IP_BIND_ADDRESS_NO_PORT
#define IP_BIND_ADDRESS_NO_PORT 24
#endif

enum { CONNECTING, FREE, BUSY, PARKED, DEAD };
#define RBUF 2048
#define MAX_PENDING_CONNECTS 512

typedef struct {
    int fd, state, idle, inq, head_done, close_after, woff, rlen, status;
    long body_left;
    uint64_t due, sent;
    char *rbuf;
} Conn;

static struct {
    struct sockaddr_in target;
    const char *path, *host, *raw;
    double rate, duration, drain, connect_rate, ramp_timeout, skip;
    int nactive, nidle, wait_go, probe_idle;
    uint64_t tick_ns;
    uint32_t src_lo, src_hi;
} opt = {.path = "/", .host = "bench", .drain = 2.0, .connect_rate = 5000,
         .ramp_timeout = 60};

static Conn *conns;
static int nconns, epfd;
static char request[512];
static int request_len;
/* FIFO ring of active connections that were free when queued (each at most once;
 * one that broke meanwhile is skipped when it comes out). */
static int *freeq, fq_head, fq_len;
static int cnt[2][5];                     /* connections per [idle][state] */
static uint32_t *lat, *svc;
static size_t nlat, caplat;
static int measuring;
static uint64_t record_from;          /* requests due before are not recorded */
static struct {
    long connect, read, eof, parse, non2xx, timeout, closed_idle, unsent, late, backlog_max;
    long ok, done_all, sent, idle_ok, idle_failed, idle_probe_ok, idle_probe_failed, reconnects;
} st;

static uint64_t now_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000u + ts.tv_nsec;
}

static void die(const char *what) { perror(what); exit(2); }

static void set_state(Conn *c, int s) {
    cnt[c->idle][c->state]--;
    cnt[c->idle][s]++;
    c->state = s;
}

static void make_free(int i) {
    Conn *c = &conns[i];
    set_state(c, FREE);
    if (!c->inq) {
        c->inq = 1;
        freeq[(fq_head + fq_len++) % opt.nactive] = i;
    }
}

/* The free active connection unused for longest, or -1. */
static int take(void) {
    while (fq_len > 0) {
        int i = freeq[fq_head];
        fq_head = (fq_head + 1) % opt.nactive;
        fq_len--;
        conns[i].inq = 0;
        if (conns[i].state == FREE) return i;
    }
    return -1;
}

static void watch(Conn *c, int i, uint32_t events, int op) {
    struct epoll_event ev = {.events = events, .data.u32 = (uint32_t)i};
    if (epoll_ctl(epfd, op, c->fd, &ev) < 0) die("epoll_ctl");
}

static void open_conn(int i) {
    Conn *c = &conns[i];
    int fd = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
    if (fd < 0) die("socket");
    int one = 1;
    setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    if (opt.src_lo) {
        struct sockaddr_in src = {.sin_family = AF_INET};
        src.sin_addr.s_addr = htonl(opt.src_lo + (uint32_t)i % (opt.src_hi - opt.src_lo + 1));
        setsockopt(fd, IPPROTO_IP, IP_BIND_ADDRESS_NO_PORT, &one, sizeof one);
        if (bind(fd, (struct sockaddr *)&src, sizeof src) < 0) die("bind source");
    }
    c->fd = fd;
    set_state(c, CONNECTING);
    c->rlen = c->head_done = c->woff = 0;
    if (connect(fd, (struct sockaddr *)&opt.target, sizeof opt.target) < 0 &&
        errno != EINPROGRESS) {
        /* reported like a failed asynchronous connect, on the next wait */
    }
    watch(c, i, EPOLLOUT | EPOLLIN, EPOLL_CTL_ADD);
}

static void close_conn(int i) {
    Conn *c = &conns[i];
    close(c->fd);
    c->fd = -1;
    set_state(c, DEAD);
}

/* Reopen broken connections (not at once: a refused connect would spin). */
static void revive(void) {
    static uint64_t last;
    uint64_t t = now_ns();
    if (t - last < 100000000u) return;
    last = t;
    for (int i = 0; i < nconns && cnt[0][CONNECTING] + cnt[1][CONNECTING] <
                                  MAX_PENDING_CONNECTS; i++)
        if (conns[i].state == DEAD && conns[i].fd == -2) {
            st.reconnects++;
            open_conn(i);
        }
}

static void send_req(int i, uint64_t due) {
    Conn *c = &conns[i];
    c->due = due;
    c->sent = now_ns();
    set_state(c, BUSY);
    c->rlen = c->head_done = 0;
    c->close_after = 0;
    ssize_t n = write(c->fd, request, request_len);
    if (n == request_len) return;
    c->woff = n < 0 ? 0 : (int)n;
    if (n < 0 && errno != EAGAIN) { c->woff = -1; return; }   /* seen as EOF on read */
    watch(c, i, EPOLLIN | EPOLLOUT, EPOLL_CTL_MOD);
}

/* Parse what arrived for connection c: 1 = response complete, 0 = more to come,
 * -1 = not an HTTP/1.x response poise-bench can frame. */
static int parse(Conn *c, const char *data, int len) {
    if (c->head_done) {
        c->body_left -= len;
        return c->body_left == 0 ? 1 : c->body_left < 0 ? -1 : 0;
    }
    if (c->rlen + len > RBUF) return -1;
    memcpy(c->rbuf + c->rlen, data, len);
    c->rlen += len;
    char *end = memmem(c->rbuf, c->rlen, "\r\n\r\n", 4);
    if (!end) return 0;
    int head = (int)(end - c->rbuf) + 4;
    if (c->rlen < 12 || memcmp(c->rbuf, "HTTP/1.", 7)) return -1;
    c->status = atoi(c->rbuf + 9);
    long cl = -1;
    for (char *line = strstr(c->rbuf, "\r\n") + 2; line < end; line = strstr(line, "\r\n") + 2) {
        if (!strncasecmp(line, "content-length:", 15)) cl = strtol(line + 15, NULL, 10);
        else if (!strncasecmp(line, "transfer-encoding:", 18)) return -1;
        else if (!strncasecmp(line, "connection:", 11) && strcasestr(line, "close") &&
                 strcasestr(line, "close") < strstr(line, "\r\n")) c->close_after = 1;
    }
    if (cl < 0) {
        if (c->status != 204 && c->status != 304) return -1;
        cl = 0;
    }
    c->head_done = 1;
    c->body_left = cl - (c->rlen - head);
    return c->body_left == 0 ? 1 : c->body_left < 0 ? -1 : 0;
}

static void record(Conn *c, uint64_t t) {
    if (nlat == caplat) {
        caplat = caplat ? caplat * 2 : 1 << 16;
        lat = realloc(lat, caplat * sizeof *lat);
        svc = realloc(svc, caplat * sizeof *svc);
        if (!lat || !svc) die("realloc");
    }
    lat[nlat] = (uint32_t)((t - c->due) / 1000);
    svc[nlat++] = (uint32_t)((t - c->sent) / 1000);
}

/* A connection broke: count it against what it was doing; revive() reopens it. */
static void broken(int i, long *counter) {
    Conn *c = &conns[i];
    int was = c->state;
    if (was == CONNECTING) st.connect++;
    else if (was == FREE || was == PARKED) st.closed_idle++;
    else if (c->idle) (*(measuring < 0 ? &st.idle_probe_failed : &st.idle_failed))++;
    else (*counter)++;
    close_conn(i);
    c->fd = -2;             /* (DEAD and to be reopened) */
}

static void readable(int i, uint64_t t) {
    Conn *c = &conns[i];
    char buf[16384];
    if (c->woff < 0) { broken(i, &st.read); return; }
    ssize_t n = read(c->fd, buf, sizeof buf);
    if (n == 0 || (n < 0 && errno != EAGAIN)) {
        broken(i, n == 0 ? &st.eof : &st.read);
        return;
    }
    if (n < 0) return;
    if (c->state != BUSY) {     /* bytes nobody asked for */
        st.parse++;
        close_conn(i);
        c->fd = -2;
        return;
    }
    int r = parse(c, buf, (int)n);
    if (r == 0) return;
    if (r < 0) { broken(i, &st.parse); return; }
    int good = c->status >= 200 && c->status < 400;
    if (c->idle) {
        if (measuring < 0) good ? st.idle_probe_ok++ : st.idle_probe_failed++;
        else good ? st.idle_ok++ : st.idle_failed++;
    } else if (measuring > 0) {
        st.done_all++;
        if (c->due >= record_from) {
            good ? st.ok++ : st.non2xx++;
            record(c, t);
        }
    }
    if (c->close_after) {       /* the server ends the connection: open another */
        close_conn(i);
        c->fd = -2;
    } else if (c->idle) {
        set_state(c, PARKED);
    } else {
        make_free(i);
    }
}

static void connected(int i) {
    Conn *c = &conns[i];
    int err = 0;
    socklen_t len = sizeof err;
    getsockopt(c->fd, SOL_SOCKET, SO_ERROR, &err, &len);
    if (err) { broken(i, &st.connect); return; }
    watch(c, i, EPOLLIN, EPOLL_CTL_MOD);
    if (c->idle) send_req(i, now_ns());
    else make_free(i);
}

static void writable(int i) {
    Conn *c = &conns[i];
    if (c->state == CONNECTING) { connected(i); return; }
    ssize_t n = write(c->fd, request + c->woff, request_len - c->woff);
    if (n < 0 && errno != EAGAIN) { broken(i, &st.read); return; }
    if (n > 0) c->woff += (int)n;
    if (c->woff == request_len) { c->woff = 0; watch(c, i, EPOLLIN, EPOLL_CTL_MOD); }
}

/* One turn of the loop: wait until `deadline` (0: no wait) for events and handle
 * them; returns 1 when stdin said something (a line or EOF). */
static int turn(uint64_t deadline) {
    struct epoll_event evs[512];
    uint64_t t = now_ns();
    struct timespec ts = {0, 0};
    if (deadline > t) {
        uint64_t d = deadline - t;
        ts.tv_sec = d / 1000000000u;
        ts.tv_nsec = d % 1000000000u;
    }
    int n = epoll_pwait2(epfd, evs, 512, &ts, NULL);
    if (n < 0 && errno != EINTR) die("epoll_pwait2");
    t = now_ns();
    int go = 0;
    revive();
    for (int k = 0; k < n; k++) {
        uint32_t i = evs[k].data.u32;
        if (i == UINT32_MAX) {
            char line[256];
            (void)!read(0, line, sizeof line);
            go = 1;
            continue;
        }
        Conn *c = &conns[i];
        if (c->state == DEAD) continue;
        if (evs[k].events & EPOLLOUT) writable(i);
        else if (evs[k].events & (EPOLLIN | EPOLLERR | EPOLLHUP)) readable(i, t);
    }
    return go;
}

/* Open every connection at most opt.connect_rate per second; returns seconds taken. */
static double ramp(void) {
    uint64_t t0 = now_ns(), limit = t0 + (uint64_t)(opt.ramp_timeout * 1e9);
    int opened = 0;
    for (;;) {
        uint64_t t = now_ns();
        long allowed = (long)((t - t0) / 1e9 * opt.connect_rate) + 1;
        while (opened < nconns && opened < allowed &&
               cnt[0][CONNECTING] + cnt[1][CONNECTING] < MAX_PENDING_CONNECTS)
            open_conn(opened++);
        if (opened == nconns && cnt[0][FREE] == opt.nactive && cnt[1][PARKED] == opt.nidle)
            break;
        if (t > limit) break;
        turn(t + 1000000);
    }
    return (now_ns() - t0) / 1e9;
}

static void measure(void) {
    uint64_t interval = (uint64_t)(1e9 / opt.rate), t0 = now_ns() + 1000000;
    uint64_t end = t0 + (uint64_t)((opt.skip + opt.duration) * 1e9);
    uint64_t total = (uint64_t)((opt.skip + opt.duration) * opt.rate), next = 0;
    record_from = t0 + (uint64_t)(opt.skip * 1e9);
    measuring = 1;
    for (;;) {
        uint64_t t = now_ns();
        uint64_t due = t < t0 ? 0 : (t - t0) / interval + 1;
        if (due > total) due = total;
        if ((long)(due - next) > st.backlog_max) st.backlog_max = (long)(due - next);
        int i;
        while (next < due && (i = take()) >= 0) {
            uint64_t when = t0 + next * interval;
            if (t - when > 1000000) st.late++;
            send_req(i, when);
            next++;
            st.sent++;
        }
        if (t >= end && next == total) break;
        if (t >= end + (uint64_t)(opt.drain * 1e9)) break;
        /* (with a backlog and no free connection only a completion can help) */
        uint64_t wake = next < due ? t + 1000000 : t0 + next * interval;
        turn(wake < t + opt.tick_ns ? t + opt.tick_ns : wake);
    }
    st.unsent = (long)(total - next);
    uint64_t stop = now_ns() + (uint64_t)(opt.drain * 1e9);
    while (cnt[0][BUSY] > 0 && now_ns() < stop)
        turn(now_ns() + 1000000);
    st.timeout = cnt[0][BUSY];
    measuring = 0;
}

static void probe_idle(void) {
    measuring = -1;
    uint64_t t0 = now_ns(), limit = t0 + (uint64_t)(opt.ramp_timeout * 1e9);
    int i = 0, sent = 0;
    while (now_ns() < limit) {
        long allowed = (long)((now_ns() - t0) / 1e9 * opt.connect_rate) + 1;
        for (; i < nconns && sent < allowed; i++)
            if (conns[i].idle && conns[i].state == PARKED) send_req(i, now_ns()), sent++;
        if (i == nconns && cnt[1][BUSY] == 0) break;
        turn(now_ns() + 1000000);
    }
    st.idle_probe_failed += cnt[1][BUSY];
    measuring = 0;
}

static int cmp_u32(const void *a, const void *b) {
    uint32_t x = *(const uint32_t *)a, y = *(const uint32_t *)b;
    return x < y ? -1 : x > y;
}

static void pcts(const char *name, uint32_t *v, size_t n) {
    qsort(v, n, sizeof *v, cmp_u32);
    static const double q[] = {0.5, 0.9, 0.99, 0.999, 0.9999};
    static const char *k[] = {"p50", "p90", "p99", "p99.9", "p99.99"};
    printf("\"%s\":{", name);
    for (int j = 0; j < 5; j++)
        printf("\"%s\":%u,", k[j], n ? v[(size_t)(q[j] * (n - 1) + 0.5)] : 0);
    printf("\"max\":%u}", n ? v[n - 1] : 0);
}

static void parse_source(const char *s) {
    char lo[32] = {0};
    const char *dash = strchr(s, '-');
    size_t len = dash ? (size_t)(dash - s) : strlen(s);
    if (len >= sizeof lo) die("--source");
    memcpy(lo, s, len);
    struct in_addr a;
    if (!inet_aton(lo, &a)) die("--source");
    opt.src_lo = ntohl(a.s_addr);
    opt.src_hi = dash ? (opt.src_lo & 0xffffff00u) | (uint32_t)atoi(dash + 1) : opt.src_lo;
    if (opt.src_hi < opt.src_lo) die("--source range");
}

int main(int argc, char **argv) {
    for (int a = 1; a < argc; a++) {
        const char *k = argv[a], *v = a + 1 < argc ? argv[a + 1] : "";
        if (!strcmp(k, "--wait-go")) { opt.wait_go = 1; continue; }
        if (!strcmp(k, "--probe-idle")) { opt.probe_idle = 1; continue; }
        a++;
        if (!strcmp(k, "--target")) {
            char host[64];
            int port;
            if (sscanf(v, "%63[^:]:%d", host, &port) != 2) die("--target HOST:PORT");
            opt.target.sin_family = AF_INET;
            opt.target.sin_port = htons((uint16_t)port);
            if (!inet_aton(host, &opt.target.sin_addr)) die("--target address");
        } else if (!strcmp(k, "--path")) opt.path = v;
        else if (!strcmp(k, "--host")) opt.host = v;
        else if (!strcmp(k, "--raw")) opt.raw = v;
        else if (!strcmp(k, "--rate")) opt.rate = atof(v);
        else if (!strcmp(k, "--duration")) opt.duration = atof(v);
        else if (!strcmp(k, "--drain")) opt.drain = atof(v);
        else if (!strcmp(k, "--skip")) opt.skip = atof(v);
        else if (!strcmp(k, "--connect-rate")) opt.connect_rate = atof(v);
        else if (!strcmp(k, "--ramp-timeout")) opt.ramp_timeout = atof(v);
        else if (!strcmp(k, "--connections")) opt.nactive = atoi(v);
        else if (!strcmp(k, "--tick-us")) opt.tick_ns = (uint64_t)(atof(v) * 1000);
        else if (!strcmp(k, "--idle")) opt.nidle = atoi(v);
        else if (!strcmp(k, "--source")) parse_source(v);
        else { fprintf(stderr, "latency_gen: unknown option %s\n", k); return 2; }
    }
    if (!opt.target.sin_port || opt.nactive < 1 || opt.rate <= 0 || opt.duration <= 0) {
        fprintf(stderr, "usage: latency_gen --target IP:PORT --rate R --duration S "
                        "--connections N [--idle N] [--source 127.0.0.A-B] [--wait-go] ...\n");
        return 2;
    }
    request_len = snprintf(request, sizeof request, "GET %s HTTP/1.1\r\nHost: %s\r\n\r\n",
                           opt.path, opt.host);
    nconns = opt.nactive + opt.nidle;
    conns = calloc(nconns, sizeof *conns);
    freeq = calloc(opt.nactive, sizeof *freeq);
    for (int i = 0; i < nconns; i++) {
        conns[i].idle = i >= opt.nactive;
        conns[i].rbuf = malloc(RBUF);
        conns[i].fd = -1;           /* (DEAD, not opened yet) */
        conns[i].state = DEAD;
        cnt[conns[i].idle][DEAD]++;
    }
    epfd = epoll_create1(EPOLL_CLOEXEC);
    if (epfd < 0) die("epoll_create1");
    double ramp_s = ramp();
    int ready_active = cnt[0][FREE], ready_idle = cnt[1][PARKED];
    if (opt.wait_go) {
        struct epoll_event ev = {.events = EPOLLIN, .data.u32 = UINT32_MAX};
        epoll_ctl(epfd, EPOLL_CTL_ADD, 0, &ev);
        printf("ready {\"active\":%d,\"idle\":%d,\"ramp_s\":%.3f,\"connect_errors\":%ld}\n",
               ready_active, ready_idle, ramp_s, st.connect);
        fflush(stdout);
        while (!turn(now_ns() + 100000000)) {}
        epoll_ctl(epfd, EPOLL_CTL_DEL, 0, NULL);     /* (a closed stdin would spin) */
    }
    struct rusage ru0, ru1;
    getrusage(RUSAGE_SELF, &ru0);
    uint64_t m0 = now_ns();
    measure();
    double measured_s = (now_ns() - m0) / 1e9;
    getrusage(RUSAGE_SELF, &ru1);
    double cpu = (ru1.ru_utime.tv_sec - ru0.ru_utime.tv_sec) +
                 (ru1.ru_stime.tv_sec - ru0.ru_stime.tv_sec) +
                 ((ru1.ru_utime.tv_usec - ru0.ru_utime.tv_usec) +
                  (ru1.ru_stime.tv_usec - ru0.ru_stime.tv_usec)) / 1e6;
    if (opt.probe_idle) probe_idle();
    if (opt.raw) {
        FILE *f = fopen(opt.raw, "wb");
        if (!f || fwrite(lat, sizeof *lat, nlat, f) != nlat || fclose(f)) die("--raw");
    }
    printf("{\"rate\":%.1f,\"duration_s\":%.3f,\"measured_s\":%.3f,\"ramp_s\":%.3f,"
           "\"active\":%d,\"idle\":%d,\"ready_active\":%d,\"ready_idle\":%d,"
           "\"sent\":%ld,\"done_all\":%ld,\"ok\":%ld,\"non2xx\":%ld,\"unsent\":%ld,\"late_sends\":%ld,"
           "\"backlog_max\":%ld,\"errors\":{\"connect\":%ld,\"read\":%ld,\"eof\":%ld,"
           "\"parse\":%ld,\"timeout\":%ld,\"closed_idle\":%ld,\"idle_failed\":%ld},"
           "\"idle_ok\":%ld,"
           "\"idle_probe_ok\":%ld,\"idle_probe_failed\":%ld,\"reconnects\":%ld,"
           "\"cpu_s\":%.3f,",
           opt.rate, opt.duration, measured_s, ramp_s, opt.nactive, opt.nidle, ready_active,
           ready_idle, st.sent, st.done_all, st.ok, st.non2xx, st.unsent, st.late, st.backlog_max,
           st.connect, st.read, st.eof, st.parse, st.timeout, st.closed_idle, st.idle_failed,
           st.idle_ok,
           st.idle_probe_ok, st.idle_probe_failed, st.reconnects, cpu);
    pcts("latency_us", lat, nlat);
    printf(",");
    pcts("service_us", svc, nlat);
    printf("}\n");
    fflush(stdout);
    if (opt.wait_go) {
        char line[64];
        while (read(0, line, sizeof line) > 0) {}
    }
    return 0;
}
