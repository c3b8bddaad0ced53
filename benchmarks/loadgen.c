/*
 * loadgen: an independent load generator for relay-to-all WebSocket servers, in C.
 *
 *     gcc -O2 -Wall -Wextra -o loadgen loadgen.c
 *     ./loadgen throughput --url ws://127.0.0.1:2000/ --clients 1000 --senders 10 --inflight 4
 *     ./loadgen idle --url ws://127.0.0.1:2000/ --clients 5000 --duration 3
 *
 * One thread, one epoll set, non-blocking sockets, libc only. It speaks the client side of
 * RFC 6455 that a benchmark needs: the opening handshake (random Sec-WebSocket-Key, 101 status
 * and Sec-WebSocket-Accept checked), masked text frames out, unmasked frames in (7/16/64-bit
 * lengths, split across reads), pong for ping, close for close.
 *
 * Its payloads are those of ``python -m wschat.bench`` (wschat/bench/frames.py), so the same
 * servers relay them and the same scenarios hold:
 *
 *     #wsb<run:4 hex>#<sender:6><seq:10><sent us:16>xxxx...
 *
 * Modes (options named as wschat.bench's):
 *
 * - throughput: --clients connect (--concurrency handshakes at once); --senders of them, spread
 *   over the clients as wschat.bench spreads them, each keep --inflight messages in flight (a
 *   sender sends its next message when one of its own comes back). After --warmup seconds,
 *   --duration seconds are measured: deliveries (bench messages received by all clients) and
 *   messages sent. Sending stops at the window's end; then up to --drain seconds for what is
 *   still on its way. Every client (or --verify N of them besides the senders) checks each
 *   sender's sequence: a number at or below one already seen is reordered; per sender, fewer
 *   messages than were sent is loss and more is duplication. The others count totals.
 * - idle: open --clients connections; handshakes/s is connections over the time from the
 *   first connect() to the last 101 read; hold them --duration seconds; count the ones the
 *   server closed.
 *
 * Output: one JSON object on stdout. On stderr, the lines "loadgen: window-start" and
 * "loadgen: window-end" mark the measured window (idle: the hold) as it happens, so a wrapper
 * can read the server's CPU and memory at the same moments (benchmarks/compare.py does).
 */
#define _GNU_SOURCE
#include <errno.h>
#include <netdb.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <signal.h>
#include <stdarg.h>
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

#define SENDER_DIGITS 6
#define SEQ_DIGITS 10
#define TIME_DIGITS 16
#define FIELDS (SENDER_DIGITS + SEQ_DIGITS + TIME_DIGITS)
#define MARKLEN 9
#define READ_SIZE (256 * 1024)
#define MAX_HEAD 65536
#define BUSY 0.9

enum { S_IDLE, S_CONNECTING, S_HANDSHAKE, S_OPEN, S_CLOSED };

struct client {
    int fd;
    int id;           /* client number; a sender's id in its payloads */
    int state;
    int sender;       /* index among the senders, or -1 */
    int inflight;
    int wantOut;      /* EPOLLOUT is registered */
    uint64_t seq;     /* next sequence number (senders) */
    uint64_t received;
    double started;   /* connect() time */
    unsigned char *carry; /* bytes read but not yet used: a partial head or frame */
    size_t carryLen;
    unsigned char *out;   /* bytes the socket did not take yet */
    size_t outLen;
    uint64_t *next;   /* verifying clients: per sender, the next sequence number expected */
    uint64_t *count;  /* verifying clients: per sender, messages received */
    char key[25];
};

static struct {
    const char *mode, *name, *url, *host, *path;
    char port[8];
    int clients, senders, inflight, size, concurrency, verify, runId, quiet;
    double duration, warmup, drain, connectTimeout;
} opt = {
    .clients = 1000, .senders = 10, .inflight = 4, .size = 64, .concurrency = 200,
    .verify = -1, .runId = -1, .duration = 10.0, .warmup = 2.0, .drain = 10.0,
    .connectTimeout = 30.0,
};

static struct client *cl;
static int *senderOf;       /* client id -> sender index, or -1 */
static int *senderIds;      /* sender index -> client id */
static uint64_t *sentBy;    /* per sender: messages sent */
static uint64_t sentTotal, delivered, deliveredClosed, foreign, reordered;
static int sending, finishing, epfd;
static struct addrinfo *addr;
static char hostHeader[300];
static char mark[MARKLEN + 1];
static int nextConnect, inProgress, connected, failed, openNow, dropped;
static double firstConnect, lastOpen, lastTimeoutCheck;
static char errors[5][160];
static int nErrors;
static unsigned char *rb, *msgBuf;
static size_t rbCap;
static uint64_t rng;
static uint32_t *lat;       /* round trips (us) of the senders' own messages sent in the window */
static size_t nLat, latCap;
static uint64_t windowStartUs, windowEndUs;

/* ---- small helpers */

static double now(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec / 1e9;
}

static uint64_t nowUs(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000u + (uint64_t)ts.tv_nsec / 1000u;
}

static uint64_t next64(void)
{
    rng ^= rng << 13;
    rng ^= rng >> 7;
    rng ^= rng << 17;
    return rng;
}

static void die(const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    fputs("loadgen: ", stderr);
    vfprintf(stderr, fmt, ap);
    fputc('\n', stderr);
    va_end(ap);
    exit(2);
}

static void *xrealloc(void *p, size_t n)
{
    p = realloc(p, n ? n : 1);
    if (!p)
        die("out of memory");
    return p;
}

static double cpuSeconds(void)
{
    struct rusage ru;
    getrusage(RUSAGE_SELF, &ru);
    return ru.ru_utime.tv_sec + ru.ru_utime.tv_usec / 1e6 + ru.ru_stime.tv_sec +
           ru.ru_stime.tv_usec / 1e6;
}

/* Seconds spent runnable but waiting for a CPU (Linux schedstat), or -1. */
static double waitSeconds(void)
{
    unsigned long long run, wait;
    double r = -1;
    FILE *f = fopen("/proc/self/schedstat", "r");
    if (f) {
        if (fscanf(f, "%llu %llu", &run, &wait) == 2)
            r = wait / 1e9;
        fclose(f);
    }
    return r;
}

static void event(const char *what)
{
    fprintf(stderr, "loadgen: %s\n", what);
    fflush(stderr);
}

/* ---- SHA-1 and base64, for Sec-WebSocket-Key and -Accept */

static uint32_t rol(uint32_t x, int n) { return (x << n) | (x >> (32 - n)); }

static void sha1Block(uint32_t h[5], const unsigned char *p)
{
    uint32_t w[80], a = h[0], b = h[1], c = h[2], d = h[3], e = h[4], f, k, t;
    int i;
    for (i = 0; i < 16; i++)
        w[i] = (uint32_t)p[4 * i] << 24 | (uint32_t)p[4 * i + 1] << 16 |
               (uint32_t)p[4 * i + 2] << 8 | (uint32_t)p[4 * i + 3];
    for (i = 16; i < 80; i++)
        w[i] = rol(w[i - 3] ^ w[i - 8] ^ w[i - 14] ^ w[i - 16], 1);
    for (i = 0; i < 80; i++) {
        if (i < 20) {
            f = (b & c) | (~b & d);
            k = 0x5A827999;
        } else if (i < 40) {
            f = b ^ c ^ d;
            k = 0x6ED9EBA1;
        } else if (i < 60) {
            f = (b & c) | (b & d) | (c & d);
            k = 0x8F1BBCDC;
        } else {
            f = b ^ c ^ d;
            k = 0xCA62C1D6;
        }
        t = rol(a, 5) + f + e + k + w[i];
        e = d;
        d = c;
        c = rol(b, 30);
        b = a;
        a = t;
    }
    h[0] += a;
    h[1] += b;
    h[2] += c;
    h[3] += d;
    h[4] += e;
}

static void sha1(const unsigned char *data, size_t len, unsigned char out[20])
{
    uint32_t h[5] = {0x67452301, 0xEFCDAB89, 0x98BADCFE, 0x10325476, 0xC3D2E1F0};
    unsigned char block[64];
    uint64_t bits = (uint64_t)len * 8;
    size_t i, full = len / 64, rest = len % 64;
    for (i = 0; i < full; i++)
        sha1Block(h, data + 64 * i);
    memset(block, 0, sizeof block);
    memcpy(block, data + 64 * full, rest);
    block[rest] = 0x80;
    if (rest >= 56) {
        sha1Block(h, block);
        memset(block, 0, sizeof block);
    }
    for (i = 0; i < 8; i++)
        block[63 - i] = (unsigned char)(bits >> (8 * i));
    sha1Block(h, block);
    for (i = 0; i < 20; i++)
        out[i] = (unsigned char)(h[i / 4] >> (24 - 8 * (i % 4)));
}

static void base64(const unsigned char *in, size_t n, char *out)
{
    static const char abc[] =
        "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    size_t i;
    for (i = 0; i + 2 < n; i += 3) {
        uint32_t v = (uint32_t)in[i] << 16 | (uint32_t)in[i + 1] << 8 | in[i + 2];
        *out++ = abc[v >> 18];
        *out++ = abc[(v >> 12) & 63];
        *out++ = abc[(v >> 6) & 63];
        *out++ = abc[v & 63];
    }
    if (n - i == 1) {
        uint32_t v = (uint32_t)in[i] << 16;
        *out++ = abc[v >> 18];
        *out++ = abc[(v >> 12) & 63];
        *out++ = '=';
        *out++ = '=';
    } else if (n - i == 2) {
        uint32_t v = (uint32_t)in[i] << 16 | (uint32_t)in[i + 1] << 8;
        *out++ = abc[v >> 18];
        *out++ = abc[(v >> 12) & 63];
        *out++ = abc[(v >> 6) & 63];
        *out++ = '=';
    }
    *out = 0;
}

static void acceptFor(const char *key, char out[29])
{
    unsigned char digest[20];
    char both[64];
    snprintf(both, sizeof both, "%s258EAFA5-E914-47DA-95CA-C5AB0DC85B11", key);
    sha1((const unsigned char *)both, strlen(both), digest);
    base64(digest, 20, out);
}

/* ---- connections */

static void watch(struct client *c, int op, uint32_t events)
{
    struct epoll_event ev = {.events = events, .data.u32 = (uint32_t)c->id};
    if (epoll_ctl(epfd, op, c->fd, &ev) < 0)
        die("epoll_ctl: %s", strerror(errno));
}

static void closeFd(struct client *c)
{
    if (c->fd >= 0)
        close(c->fd); /* also leaves the epoll set */
    c->fd = -1;
    c->state = S_CLOSED;
    free(c->carry);
    free(c->out);
    c->carry = c->out = NULL;
    c->carryLen = c->outLen = 0;
}

/* A connection that never opened: counted as failed, its reason kept (the first few). */
static void fail(struct client *c, const char *fmt, ...)
{
    va_list ap;
    if (nErrors < 5) {
        va_start(ap, fmt);
        vsnprintf(errors[nErrors++], sizeof errors[0], fmt, ap);
        va_end(ap);
    }
    if (c->state == S_CONNECTING || c->state == S_HANDSHAKE)
        inProgress--;
    failed++;
    closeFd(c);
}

/* An open connection that ended: by the server, unless we are finishing. */
static void gone(struct client *c)
{
    if (c->state != S_OPEN)
        return;
    if (!finishing)
        dropped++;
    openNow--;
    deliveredClosed += c->received;
    closeFd(c);
}

static void startConnect(struct client *c)
{
    int one = 1;
    int fd = socket(addr->ai_family, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
    c->started = now();
    if (firstConnect == 0)
        firstConnect = c->started;
    c->state = S_CONNECTING;
    inProgress++;
    if (fd < 0) {
        fail(c, "socket: %s", strerror(errno));
        return;
    }
    c->fd = fd;
    setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    if (connect(fd, addr->ai_addr, addr->ai_addrlen) < 0 && errno != EINPROGRESS) {
        fail(c, "connect: %s", strerror(errno));
        return;
    }
    watch(c, EPOLL_CTL_ADD, EPOLLOUT);
}

static void startMore(void)
{
    while (nextConnect < opt.clients && inProgress < opt.concurrency)
        startConnect(&cl[nextConnect++]);
}

static void checkTimeouts(void)
{
    double t = now();
    int i;
    if (inProgress == 0 || t - lastTimeoutCheck < 0.1)
        return;
    lastTimeoutCheck = t;
    for (i = 0; i < nextConnect; i++)
        if ((cl[i].state == S_CONNECTING || cl[i].state == S_HANDSHAKE) &&
            t - cl[i].started > opt.connectTimeout)
            fail(&cl[i], "timed out after %g s", opt.connectTimeout);
}

/* Send ``data`` (all of it, now or when the socket takes it). */
static void put(struct client *c, const unsigned char *data, size_t len)
{
    ssize_t n = 0;
    if (c->state != S_OPEN && c->state != S_HANDSHAKE)
        return;
    if (c->outLen == 0) {
        n = send(c->fd, data, len, MSG_NOSIGNAL);
        if (n < 0) {
            if (errno != EAGAIN && errno != EWOULDBLOCK) {
                gone(c);
                return;
            }
            n = 0;
        }
        if ((size_t)n == len)
            return;
    }
    c->out = xrealloc(c->out, c->outLen + len - n);
    memcpy(c->out + c->outLen, data + n, len - n);
    c->outLen += len - n;
    if (!c->wantOut) {
        c->wantOut = 1;
        watch(c, EPOLL_CTL_MOD, EPOLLIN | EPOLLOUT);
    }
}

static void flush(struct client *c)
{
    ssize_t n = send(c->fd, c->out, c->outLen, MSG_NOSIGNAL);
    if (n < 0) {
        if (errno != EAGAIN && errno != EWOULDBLOCK)
            gone(c);
        return;
    }
    memmove(c->out, c->out + n, c->outLen - n);
    c->outLen -= n;
    if (c->outLen == 0) {
        c->wantOut = 0;
        watch(c, EPOLL_CTL_MOD, EPOLLIN);
    }
}

/* A masked client frame (random key) with ``len`` bytes of ``data``, sent. */
static void sendFrame(struct client *c, int opcode, const unsigned char *data, size_t len)
{
    static unsigned char *buf;
    static size_t cap;
    size_t h = 2, i;
    uint32_t key = (uint32_t)next64();
    unsigned char *k;
    if (cap < len + 14) {
        cap = len + 14;
        buf = xrealloc(buf, cap);
    }
    buf[0] = (unsigned char)(0x80 | opcode);
    if (len < 126) {
        buf[1] = (unsigned char)(0x80 | len);
    } else if (len <= 0xFFFF) {
        buf[1] = 0x80 | 126;
        buf[2] = (unsigned char)(len >> 8);
        buf[3] = (unsigned char)len;
        h = 4;
    } else {
        buf[1] = 0x80 | 127;
        for (i = 0; i < 8; i++)
            buf[2 + i] = (unsigned char)((uint64_t)len >> (56 - 8 * i));
        h = 10;
    }
    k = buf + h;
    memcpy(k, &key, 4);
    for (i = 0; i < len; i++)
        buf[h + 4 + i] = data[i] ^ k[i & 3];
    put(c, buf, h + 4 + len);
}

static void sendMessage(struct client *c)
{
    char head[MARKLEN + FIELDS + 1];
    snprintf(head, sizeof head, "%s%06d%010llu%016llu", mark, c->id,
             (unsigned long long)(c->seq % 10000000000ull),
             (unsigned long long)(nowUs() % 10000000000000000ull));
    memcpy(msgBuf, head, MARKLEN + FIELDS);
    c->seq++;
    sentBy[c->sender]++;
    sentTotal++;
    sendFrame(c, 0x1, msgBuf, (size_t)opt.size);
}

static uint64_t digits(const unsigned char *p, int n, int *bad)
{
    uint64_t v = 0;
    int i;
    for (i = 0; i < n; i++) {
        if (p[i] < '0' || p[i] > '9')
            *bad = 1;
        v = v * 10 + (uint64_t)(p[i] - '0');
    }
    return v;
}

static void ownEcho(struct client *c, uint64_t sentUs)
{
    if (c->inflight <= 0)
        return;
    c->inflight--;
    if (sentUs >= windowStartUs && sentUs < windowEndUs) {
        if (nLat == latCap) {
            latCap = latCap ? 2 * latCap : 65536;
            lat = xrealloc(lat, latCap * sizeof *lat);
        }
        lat[nLat++] = (uint32_t)(nowUs() - sentUs);
    }
    if (sending) {
        c->inflight++;
        sendMessage(c);
    }
}

/* One data frame's payload: a bench message if it carries this run's marker. */
static void message(struct client *c, const unsigned char *p, size_t len)
{
    /* A server that relays payloads unchanged puts the marker first: no search then. */
    const unsigned char *m = len >= MARKLEN && memcmp(p, mark, MARKLEN) == 0
                                 ? p
                                 : memmem(p, len, mark, MARKLEN);
    const unsigned char *f;
    uint64_t sender, seq;
    int bad = 0, si;
    if (!m || (size_t)(p + len - m) < MARKLEN + FIELDS)
        return;
    f = m + MARKLEN;
    sender = digits(f, SENDER_DIGITS, &bad);
    seq = digits(f + SENDER_DIGITS, SEQ_DIGITS, &bad);
    c->received++;
    delivered++;
    si = !bad && sender < (uint64_t)opt.clients ? senderOf[sender] : -1;
    if (si < 0) {
        foreign++;
        return;
    }
    if (c->next) {
        if (seq < c->next[si])
            reordered++;
        else
            c->next[si] = seq + 1;
        c->count[si]++;
    }
    if ((int)sender == c->id) /* the send time is read only here, where it is used */
        ownEcho(c, digits(f + SENDER_DIGITS + SEQ_DIGITS, TIME_DIGITS, &bad));
}

/* Read the frames at the start of b[0..n); returns the bytes used (a partial frame is left). */
static size_t frames(struct client *c, const unsigned char *b, size_t n)
{
    size_t i = 0;
    while (c->state == S_OPEN && n - i >= 2) {
        int op = b[i] & 0x0F, masked = b[i + 1] & 0x80;
        uint64_t len = b[i + 1] & 0x7F;
        size_t h = i + 2, k;
        if (len == 126) {
            if (n - i < 4)
                break;
            len = (uint64_t)b[i + 2] << 8 | b[i + 3];
            h = i + 4;
        } else if (len == 127) {
            if (n - i < 10)
                break;
            for (len = 0, k = 0; k < 8; k++)
                len = len << 8 | b[i + 2 + k];
            h = i + 10;
        }
        if (masked) /* servers must not mask; read past the key all the same */
            h += 4;
        if (h > n || len > n - h)
            break;
        i = h + (size_t)len;
        if (op < 0x8) {
            message(c, b + h, (size_t)len);
        } else if (op == 0x9) {
            sendFrame(c, 0xA, b + h, (size_t)len);
        } else if (op == 0x8) {
            sendFrame(c, 0x8, b + h, len < 2 ? (size_t)len : 2);
            gone(c);
        }
    }
    return i;
}

/* The server's answer to the opening handshake; returns the bytes it takes, 0 if partial. */
static size_t handshake(struct client *c, const unsigned char *b, size_t n)
{
    const char *head = (const char *)b, *end = memmem(b, n, "\r\n\r\n", 4), *p, *eol;
    char expected[29];
    size_t used;
    if (!end) {
        if (n > MAX_HEAD)
            fail(c, "handshake response headers longer than %d bytes", MAX_HEAD);
        return 0;
    }
    used = (size_t)(end - head) + 4;
    eol = memchr(head, '\r', n);
    p = memchr(head, ' ', (size_t)(eol - head));
    if (!p || eol - p < 4 || memcmp(p + 1, "101", 3) != 0) {
        fail(c, "server answered '%.*s', not 101", (int)(eol - head > 80 ? 80 : eol - head), head);
        return 0;
    }
    acceptFor(c->key, expected);
    for (p = eol; p && p < end; p = memchr(p + 2, '\r', (size_t)(end + 2 - (p + 2)))) {
        const char *name = p + 2;
        if (end - name > 21 && strncasecmp(name, "Sec-WebSocket-Accept:", 21) == 0) {
            const char *v = name + 21;
            while (*v == ' ' || *v == '\t')
                v++;
            if ((size_t)(end - v) < 28 || memcmp(v, expected, 28) != 0) {
                fail(c, "wrong Sec-WebSocket-Accept");
                return 0;
            }
            break;
        }
    }
    if (!p || p >= end) {
        fail(c, "no Sec-WebSocket-Accept in the 101 answer");
        return 0;
    }
    c->state = S_OPEN;
    inProgress--;
    connected++;
    openNow++;
    lastOpen = now();
    return used;
}

static void onReadable(struct client *c)
{
    size_t n = c->carryLen, used = 0;
    ssize_t r;
    if (rbCap < n + READ_SIZE) {
        rbCap = n + READ_SIZE;
        rb = xrealloc(rb, rbCap);
    }
    if (n)
        memcpy(rb, c->carry, n);
    r = read(c->fd, rb + n, rbCap - n);
    if (r <= 0) {
        if (r < 0 && (errno == EAGAIN || errno == EWOULDBLOCK || errno == EINTR))
            return;
        if (c->state == S_HANDSHAKE)
            fail(c, "closed during the handshake: %s", r ? strerror(errno) : "end of stream");
        else
            gone(c);
        return;
    }
    n += (size_t)r;
    if (c->state == S_HANDSHAKE) {
        used = handshake(c, rb, n);
        if (c->state == S_CLOSED)
            return;
    }
    if (c->state == S_OPEN)
        used += frames(c, rb + used, n - used);
    if (c->state == S_CLOSED)
        return;
    c->carryLen = n - used;
    if (c->carryLen) {
        c->carry = xrealloc(c->carry, c->carryLen);
        memcpy(c->carry, rb + used, c->carryLen);
    }
}

static void onConnected(struct client *c)
{
    char request[1024];
    int err = 0, len;
    unsigned char nonce[16];
    socklen_t l = sizeof err;
    uint64_t a = next64(), b = next64();
    if (getsockopt(c->fd, SOL_SOCKET, SO_ERROR, &err, &l) < 0)
        err = errno;
    if (err) {
        fail(c, "connect: %s", strerror(err));
        return;
    }
    memcpy(nonce, &a, 8);
    memcpy(nonce + 8, &b, 8);
    base64(nonce, 16, c->key);
    len = snprintf(request, sizeof request,
                   "GET %s HTTP/1.1\r\nHost: %s\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                   "Sec-WebSocket-Key: %s\r\nSec-WebSocket-Version: 13\r\n\r\n",
                   opt.path, hostHeader, c->key);
    c->state = S_HANDSHAKE;
    watch(c, EPOLL_CTL_MOD, EPOLLIN);
    put(c, (const unsigned char *)request, (size_t)len);
}

/* Serve the sockets until time ``until`` or until ``stop()`` says so. */
static void pump(double until, int (*stop)(void))
{
    struct epoll_event evs[512];
    int i, n, ms;
    double t;
    for (;;) {
        startMore();
        checkTimeouts();
        if (stop && stop())
            return;
        t = now();
        if (t >= until)
            return;
        ms = (int)((until - t) * 1000) + 1;
        n = epoll_wait(epfd, evs, 512, ms > 100 ? 100 : ms);
        if (n < 0 && errno != EINTR)
            die("epoll_wait: %s", strerror(errno));
        for (i = 0; i < n; i++) {
            struct client *c = &cl[evs[i].data.u32];
            uint32_t e = evs[i].events;
            if (c->state == S_CONNECTING) {
                onConnected(c);
                continue;
            }
            if (c->state == S_CLOSED)
                continue;
            if ((e & EPOLLOUT) && c->outLen)
                flush(c);
            if (c->state != S_CLOSED && (e & (EPOLLIN | EPOLLHUP | EPOLLERR)))
                onReadable(c);
        }
    }
}

static int allConnected(void) { return nextConnect == opt.clients && inProgress == 0; }

/*
 * Whether every open client has received every message sent: per sender for the verifying
 * clients (so a duplicate cannot stand in for a message still on its way), in total for the
 * others. The full check runs only once the totals say it may hold, and when they changed.
 */
static int drained(void)
{
    static uint64_t checkedAt = UINT64_MAX, checkedSent;
    static int checkedOpen, answer;
    int i, k;
    if (delivered - deliveredClosed < sentTotal * (uint64_t)openNow)
        return 0;
    if (delivered == checkedAt && sentTotal == checkedSent && openNow == checkedOpen)
        return answer;
    checkedAt = delivered;
    checkedSent = sentTotal;
    checkedOpen = openNow;
    answer = 0;
    for (i = 0; i < opt.clients; i++) {
        struct client *c = &cl[i];
        if (c->state != S_OPEN)
            continue;
        if (c->received < sentTotal)
            return 0;
        for (k = 0; c->count && k < opt.senders; k++)
            if (c->count[k] < sentBy[k])
                return 0;
    }
    return answer = 1;
}

/* ---- output */

static void jsonString(const char *s)
{
    putchar('"');
    for (; *s; s++) {
        if (*s == '"' || *s == '\\')
            printf("\\%c", *s);
        else if ((unsigned char)*s < 0x20)
            printf("\\u%04x", *s);
        else
            putchar(*s);
    }
    putchar('"');
}

static char warnings[16][256];
static int nWarnings;

static void warn(const char *fmt, ...)
{
    va_list ap;
    if (nWarnings == 16)
        return;
    va_start(ap, fmt);
    vsnprintf(warnings[nWarnings++], sizeof warnings[0], fmt, ap);
    va_end(ap);
}

static int byValue(const void *a, const void *b)
{
    uint32_t x = *(const uint32_t *)a, y = *(const uint32_t *)b;
    return x < y ? -1 : x > y;
}

static double percentile(double p)
{
    size_t rank = (size_t)(p / 100 * nLat + 0.999999);
    if (rank < 1)
        rank = 1;
    return lat[rank - 1] / 1000.0;
}

struct snapshot {
    double time, cpu, wait;
    uint64_t sent, delivered;
};

static void snap(struct snapshot *s)
{
    s->time = now();
    s->cpu = cpuSeconds();
    s->wait = waitSeconds();
    s->sent = sentTotal;
    s->delivered = delivered;
}

static void usage(void)
{
    fprintf(stderr,
            "usage: loadgen throughput|idle --url [NAME=]ws://HOST:PORT/PATH [--clients N]\n"
            "  [--senders S] [--inflight K] [--size BYTES] [--duration S] [--warmup S]\n"
            "  [--drain S] [--concurrency C] [--connect-timeout S] [--verify all|N]\n"
            "  [--run-id 0-65535] [--quiet]\n");
    exit(2);
}

static void parseUrl(const char *value)
{
    const char *eq = strchr(value, '='), *u = value, *hostStart, *hostEnd, *portStart, *slash;
    static char host[256];
    size_t hl;
    if (eq && !memmem(value, (size_t)(eq - value), "://", 3)) {
        opt.name = strndup(value, (size_t)(eq - value));
        u = eq + 1;
    } else {
        opt.name = value;
    }
    opt.url = u;
    if (strncmp(u, "ws://", 5) != 0)
        die("--url %s: only ws:// URLs are supported", u);
    hostStart = u + 5;
    slash = strchr(hostStart, '/');
    opt.path = slash ? slash : "/";
    if (!slash)
        slash = hostStart + strlen(hostStart);
    if (*hostStart == '[') {
        hostStart++;
        hostEnd = memchr(hostStart, ']', (size_t)(slash - hostStart));
        if (!hostEnd)
            die("--url %s: unclosed [", u);
        portStart = hostEnd[1] == ':' ? hostEnd + 2 : NULL;
    } else {
        hostEnd = memchr(hostStart, ':', (size_t)(slash - hostStart));
        portStart = hostEnd ? hostEnd + 1 : NULL;
        if (!hostEnd)
            hostEnd = slash;
    }
    hl = (size_t)(hostEnd - hostStart);
    if (hl == 0 || hl >= sizeof host)
        die("--url %s: no host", u);
    memcpy(host, hostStart, hl);
    host[hl] = 0;
    opt.host = host;
    if (portStart && portStart < slash && (size_t)(slash - portStart) < sizeof opt.port)
        snprintf(opt.port, sizeof opt.port, "%.*s", (int)(slash - portStart), portStart);
    else
        strcpy(opt.port, "80");
    snprintf(hostHeader, sizeof hostHeader, strchr(host, ':') ? "[%s]:%s" : "%s:%s", host,
             opt.port);
}

static double number(const char *name, const char *v, double low)
{
    char *end;
    double d = strtod(v, &end);
    if (*v == 0 || *end != 0 || d < low)
        die("%s %s: expected a number of at least %g", name, v, low);
    return d;
}

static void parse(int argc, char **argv)
{
    int i;
    if (argc < 2 || argv[1][0] == '-')
        usage();
    opt.mode = argv[1];
    if (strcmp(opt.mode, "throughput") != 0 && strcmp(opt.mode, "idle") != 0)
        die("mode must be throughput or idle, not %s", opt.mode);
    for (i = 2; i < argc; i++) {
        const char *a = argv[i], *v = i + 1 < argc ? argv[i + 1] : NULL;
        if (strcmp(a, "--quiet") == 0 || strcmp(a, "-q") == 0) {
            opt.quiet = 1;
            continue;
        }
        if (strcmp(a, "--json") == 0) /* always JSON; accepted as wschat.bench takes it */
            continue;
        if (!v)
            usage();
        i++;
        if (strcmp(a, "--url") == 0 || strcmp(a, "-u") == 0)
            parseUrl(v);
        else if (strcmp(a, "--clients") == 0 || strcmp(a, "-c") == 0)
            opt.clients = (int)number(a, v, 1);
        else if (strcmp(a, "--senders") == 0 || strcmp(a, "-s") == 0)
            opt.senders = (int)number(a, v, 0);
        else if (strcmp(a, "--inflight") == 0 || strcmp(a, "-w") == 0)
            opt.inflight = (int)number(a, v, 1);
        else if (strcmp(a, "--size") == 0)
            opt.size = (int)number(a, v, MARKLEN + FIELDS);
        else if (strcmp(a, "--duration") == 0 || strcmp(a, "-d") == 0)
            opt.duration = number(a, v, 0.001);
        else if (strcmp(a, "--warmup") == 0)
            opt.warmup = number(a, v, 0);
        else if (strcmp(a, "--drain") == 0)
            opt.drain = number(a, v, 0);
        else if (strcmp(a, "--concurrency") == 0)
            opt.concurrency = (int)number(a, v, 1);
        else if (strcmp(a, "--connect-timeout") == 0)
            opt.connectTimeout = number(a, v, 0.001);
        else if (strcmp(a, "--verify") == 0)
            opt.verify = strcmp(v, "all") == 0 ? -1 : (int)number(a, v, 0);
        else if (strcmp(a, "--run-id") == 0)
            opt.runId = (int)number(a, v, 0);
        else
            die("unknown option %s", a);
    }
    if (!opt.url)
        parseUrl("ws://127.0.0.1:2000/");
    if (opt.size > 16 * 1024 * 1024)
        die("--size is at most 16 MiB");
    if (opt.runId > 0xFFFF)
        die("--run-id must be in 0-65535");
    if (strcmp(opt.mode, "idle") == 0)
        opt.senders = 0;
    else if (opt.senders < 1 || opt.senders > opt.clients)
        die("--senders must be between 1 and --clients");
}

int main(int argc, char **argv)
{
    struct addrinfo hints = {.ai_socktype = SOCK_STREAM};
    struct rlimit rl;
    struct snapshot s0, s1;
    int i, k, rc, throughput, verifiers = 0;
    double step, hsSpan, wall;
    uint64_t lost = 0, duplicated = 0, minRecv = UINT64_MAX, maxRecv = 0, target;
    int isDrained = 1;

    parse(argc, argv);
    throughput = strcmp(opt.mode, "throughput") == 0;
    signal(SIGPIPE, SIG_IGN);
    rng = (uint64_t)nowUs() ^ ((uint64_t)getpid() << 32) ^ 0x9E3779B97F4A7C15ull;
    if (opt.runId < 0)
        opt.runId = (int)(next64() & 0xFFFF);
    snprintf(mark, sizeof mark, "#wsb%04x#", opt.runId);
    if (getrlimit(RLIMIT_NOFILE, &rl) == 0 && rl.rlim_cur < rl.rlim_max) {
        rl.rlim_cur = rl.rlim_max;
        setrlimit(RLIMIT_NOFILE, &rl);
    }
    if ((rc = getaddrinfo(opt.host, opt.port, &hints, &addr)) != 0)
        die("%s: %s", opt.host, gai_strerror(rc));
    epfd = epoll_create1(EPOLL_CLOEXEC);
    if (epfd < 0)
        die("epoll_create1: %s", strerror(errno));

    /* Senders spread over the clients as wschat.bench spreads them: int(k * clients / S). */
    cl = calloc((size_t)opt.clients, sizeof *cl);
    senderOf = malloc((size_t)opt.clients * sizeof *senderOf);
    senderIds = calloc((size_t)opt.senders + 1, sizeof *senderIds);
    sentBy = calloc((size_t)opt.senders + 1, sizeof *sentBy);
    msgBuf = malloc((size_t)opt.size);
    if (!cl || !senderOf || !senderIds || !sentBy || !msgBuf)
        die("out of memory");
    memset(msgBuf, 'x', (size_t)opt.size);
    for (i = 0; i < opt.clients; i++) {
        cl[i].fd = -1;
        cl[i].id = i;
        cl[i].sender = -1;
        senderOf[i] = -1;
    }
    step = opt.senders ? (double)opt.clients / opt.senders : 1;
    for (k = 0; k < opt.senders; k++) {
        int id = (int)(k * step);
        senderOf[id] = k;
        senderIds[k] = id;
        cl[id].sender = k;
    }
    /* Verifying clients: every one (--verify all), else the senders and N others spread out. */
    if (throughput) {
        int others = opt.clients - opt.senders;
        int stride = opt.verify > 0 && others / opt.verify > 1 ? others / opt.verify : 1;
        int seen = 0, extra = 0;
        for (i = 0; i < opt.clients; i++) {
            int v = opt.verify < 0 || cl[i].sender >= 0;
            if (!v && opt.verify > 0 && extra < opt.verify && seen++ % stride == 0) {
                v = 1;
                extra++;
            }
            if (v) {
                cl[i].next = calloc((size_t)opt.senders, sizeof *cl[i].next);
                cl[i].count = calloc((size_t)opt.senders, sizeof *cl[i].count);
                if (!cl[i].next || !cl[i].count)
                    die("out of memory");
                verifiers++;
            }
        }
    }

    pump(now() + opt.connectTimeout + opt.clients / 100.0 + 30, allConnected);
    hsSpan = lastOpen - firstConnect;
    if (connected < opt.clients)
        warn("only %d of %d clients connected: %s", connected, opt.clients,
             nErrors ? errors[0] : "connecting took too long");

    if (connected == 0) {
        snap(&s0);
        s1 = s0;
    } else if (throughput) {
        sending = 1;
        for (k = 0; k < opt.senders; k++) {
            struct client *c = &cl[senderIds[k]];
            for (i = 0; i < opt.inflight && c->state == S_OPEN; i++) {
                c->inflight++;
                sendMessage(c);
            }
        }
        windowStartUs = nowUs() + (uint64_t)(opt.warmup * 1e6);
        windowEndUs = windowStartUs + (uint64_t)(opt.duration * 1e6);
        pump(now() + opt.warmup, NULL);
        snap(&s0);
        event("window-start");
        pump(s0.time + opt.duration, NULL);
        snap(&s1);
        event("window-end");
        sending = 0;
        pump(now() + opt.drain, drained);
        isDrained = drained();
    } else {
        snap(&s0);
        event("window-start");
        pump(s0.time + opt.duration, NULL);
        snap(&s1);
        event("window-end");
    }
    finishing = 1;
    wall = s1.time - s0.time;

    for (i = 0; i < opt.clients; i++) {
        struct client *c = &cl[i];
        if (c->state != S_OPEN && !(c->state == S_CLOSED && c->received))
            continue;
        if (c->received < minRecv)
            minRecv = c->received;
        if (c->received > maxRecv)
            maxRecv = c->received;
        if (!throughput)
            continue;
        if (c->next) {
            for (k = 0; k < opt.senders; k++) {
                target = sentBy[k];
                lost += c->count[k] < target ? target - c->count[k] : 0;
                duplicated += c->count[k] > target ? c->count[k] - target : 0;
            }
        } else {
            lost += c->received < sentTotal ? sentTotal - c->received : 0;
            duplicated += c->received > sentTotal ? c->received - sentTotal : 0;
        }
    }
    if (minRecv == UINT64_MAX)
        minRecv = 0;

    printf("{\"tool\": \"loadgen\", \"server\": ");
    jsonString(opt.name);
    printf(", \"url\": ");
    jsonString(opt.url);
    printf(", \"mode\": \"%s\", \"clients\": %d, \"connected\": %d, \"failed\": %d,"
           " \"connect_errors\": [",
           opt.mode, opt.clients, connected, failed);
    for (i = 0; i < nErrors; i++) {
        if (i)
            printf(", ");
        jsonString(errors[i]);
    }
    printf("], \"handshakes_per_s\": ");
    if (connected && hsSpan > 0)
        printf("%.1f", connected / hsSpan);
    else
        printf("null");
    printf(", \"concurrency\": %d, \"processes\": 1, \"size\": %d, \"duration\": %.3f",
           opt.concurrency, opt.size, wall);
    if (throughput) {
        double cpu = wall > 0 ? (s1.cpu - s0.cpu) / wall : 0;
        printf(", \"senders\": %d, \"inflight\": %d, \"sent_total\": %llu,"
               " \"sent_per_s\": %.1f, \"deliveries_per_s\": %.1f, \"verified_clients\": %d,"
               " \"lost\": %llu, \"reordered\": %llu, \"duplicated\": %llu, \"foreign\": %llu,"
               " \"min_received\": %llu, \"max_received\": %llu, \"drained\": %s,"
               " \"bench_cpu\": %.3f, \"bench_cores\": 1",
               opt.senders, opt.inflight, (unsigned long long)sentTotal,
               wall > 0 ? (s1.sent - s0.sent) / wall : 0.0,
               wall > 0 ? (s1.delivered - s0.delivered) / wall : 0.0, verifiers,
               (unsigned long long)lost, (unsigned long long)reordered,
               (unsigned long long)duplicated, (unsigned long long)foreign,
               (unsigned long long)minRecv, (unsigned long long)maxRecv,
               isDrained ? "true" : "false", cpu);
        if (s0.wait >= 0 && s1.wait >= 0 && wall > 0)
            printf(", \"bench_cpu_wait\": %.3f", (s1.wait - s0.wait) / wall);
        if (nLat) {
            qsort(lat, nLat, sizeof *lat, byValue);
            printf(", \"latency_ms\": {\"p50\": %.3f, \"p90\": %.3f, \"p99\": %.3f,"
                   " \"max\": %.3f, \"samples\": %zu}",
                   percentile(50), percentile(90), percentile(99), percentile(100), nLat);
        }
        if (cpu > BUSY)
            warn("the load generator used %.0f%% of its core: it may be the bottleneck",
                 cpu * 100);
        if (s0.wait >= 0 && wall > 0 && (s1.wait - s0.wait) / wall > 0.1)
            warn("the load generator waited for a CPU %.0f%% of the time: the machine is busy "
                 "with other work, so these figures are noisy",
                 (s1.wait - s0.wait) / wall * 100);
        if (!isDrained)
            warn("deliveries were still arriving when the %g s drain ended: those not yet "
                 "arrived count as lost (the server was overloaded)",
                 opt.drain);
        if (lost || reordered || duplicated)
            warn("%llu deliveries lost, %llu reordered, %llu duplicated",
                 (unsigned long long)lost, (unsigned long long)reordered,
                 (unsigned long long)duplicated);
        if (foreign)
            warn("%llu messages carried the marker with a malformed or unknown sender",
                 (unsigned long long)foreign);
    } else {
        printf(", \"held\": %d", openNow);
    }
    printf(", \"dropped\": %d", dropped);
    if (dropped)
        warn(throughput ? "the server closed %d connections during the run"
                        : "the server closed %d idle connections",
             dropped);
    printf(", \"warnings\": [");
    for (i = 0; i < nWarnings; i++) {
        if (i)
            printf(", ");
        jsonString(warnings[i]);
    }
    printf("]}\n");
    fflush(stdout);
    return connected ? 0 : 1;
}
