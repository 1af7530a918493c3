// The raw rabbitmq-c baseline of the chain benchmark: one hop of producer -> A -> B -> sink.
//
//   chain-baseline-c HOST PORT QUEUE NEXT_ROUTING_KEY|- EXCHANGE DB_PATH LATENCY_FILE|- COUNT [batch|per-event]
//
// Consumes QUEUE with prefetch CHAIN_IN_FLIGHT (default 256); for every batch of deliveries that are available
// at once it inserts each event id into SQLite (the same "ledger" row per event as a Choreo hop) in one
// transaction, or with `per-event` in a transaction of its own per event (as a straightforward consumer would),
// publishes the next event to EXCHANGE with routing key NEXT (persistent, publisher confirms, waiting for the
// batch's confirms; the input's CloudEvents headers go on with a new id and the input's as the causation id, so
// messages are as large as a Choreo hop's), then acks the batch with one multiple ack. A sink (NEXT = -)
// appends each event's latency in microseconds, from the `sentAt` in its body, to LATENCY_FILE. Exits after
// COUNT events.
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <stdint.h>
#include <time.h>
#include <sqlite3.h>
#if __has_include(<rabbitmq-c/amqp.h>)
#include <rabbitmq-c/amqp.h>
#include <rabbitmq-c/tcp_socket.h>
#else
#include <amqp.h>
#include <amqp_tcp_socket.h>
#endif

static double now_s(void) {
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
}

#define MAX_HEADERS 32

static int bytes_equal(amqp_bytes_t b, const char *s) {
    size_t n = strlen(s);
    return b.len == n && memcmp(b.bytes, s, n) == 0;
}

/// A deterministic id for the event a hop emits, 36 characters like a Choreo hop's derived UUID: FNV-1a of
/// the input id and the next routing key.
static void derived_id(char out[40], amqp_bytes_t input, const char *next) {
    uint64_t h1 = 1469598103934665603ULL, h2 = 1099511628211ULL * 31;
    for (size_t i = 0; i < input.len; i++) {
        h1 = (h1 ^ ((unsigned char *)input.bytes)[i]) * 1099511628211ULL;
        h2 = (h2 ^ ((unsigned char *)input.bytes)[i]) * 1099511628211ULL;
    }
    for (const char *c = next; *c; c++) h1 = (h1 ^ (unsigned char)*c) * 1099511628211ULL;
    snprintf(out, 40, "%08x-%04x-%04x-%04x-%012llx", (unsigned)(h1 >> 32), (unsigned)(h1 >> 16) & 0xffff,
             (unsigned)h1 & 0xffff, (unsigned)(h2 >> 48), (unsigned long long)(h2 & 0xffffffffffffULL));
}

static void die(const char *what) {
    fprintf(stderr, "chain-baseline-c: %s failed\n", what);
    exit(1);
}

static void check(amqp_rpc_reply_t r, const char *what) {
    if (r.reply_type != AMQP_RESPONSE_NORMAL) die(what);
}

static amqp_connection_state_t open_connection(const char *host, int port) {
    amqp_connection_state_t conn = amqp_new_connection();
    amqp_socket_t *sock = amqp_tcp_socket_new(conn);
    if (amqp_socket_open(sock, host, port) != AMQP_STATUS_OK) die("connect");
    check(amqp_login(conn, "/", 0, 131072, 30, AMQP_SASL_METHOD_PLAIN, "guest", "guest"), "login");
    amqp_channel_open(conn, 1);
    check(amqp_get_rpc_reply(conn), "channel.open");
    return conn;
}

int main(int argc, char **argv) {
    if (argc != 9 && argc != 10) {
        fprintf(stderr, "usage: %s HOST PORT QUEUE NEXT|- EXCHANGE DB LATENCY|- COUNT [batch|per-event]\n", argv[0]);
        return 2;
    }
    int per_event = argc == 10 && strcmp(argv[9], "per-event") == 0;
    const char *host = argv[1], *queue = argv[3], *next = argv[4], *exchange = argv[5], *dbpath = argv[6], *latpath = argv[7];
    int port = atoi(argv[2]);
    long count = atol(argv[8]);
    int is_sink = strcmp(next, "-") == 0;

    sqlite3 *db;
    if (sqlite3_open(dbpath, &db) != SQLITE_OK) die("sqlite open");
    sqlite3_exec(db, "PRAGMA journal_mode=WAL; PRAGMA synchronous=NORMAL;"
                     "CREATE TABLE IF NOT EXISTS ledger (id TEXT PRIMARY KEY, at REAL)", 0, 0, 0);
    sqlite3_stmt *insert;
    sqlite3_prepare_v2(db, "INSERT OR IGNORE INTO ledger VALUES (?, ?)", -1, &insert, 0);
    FILE *lat = strcmp(latpath, "-") == 0 ? NULL : fopen(latpath, "a");

    // Separate connections for consuming and publishing, as RabbitMQ advises (and as Choreo does).
    amqp_connection_state_t conn = open_connection(host, port);
    amqp_connection_state_t pconn = open_connection(host, port);
    amqp_confirm_select(pconn, 1);
    check(amqp_get_rpc_reply(pconn), "confirm.select");
    // Deliveries in flight (prefetch and largest batch): CHAIN_IN_FLIGHT, as the Choreo hops' --concurrency.
    const char *in_flight = getenv("CHAIN_IN_FLIGHT");
    int max_batch = in_flight ? atoi(in_flight) : 256;
    if (max_batch < 1 || max_batch > 65535) die("CHAIN_IN_FLIGHT (1 to 65535)");
    amqp_basic_qos(conn, 1, 0, (uint16_t)max_batch, 0);
    check(amqp_get_rpc_reply(conn), "basic.qos");
    amqp_basic_consume(conn, 1, amqp_cstring_bytes(queue), amqp_empty_bytes, 0, 0, 0, amqp_empty_table);
    check(amqp_get_rpc_reply(conn), "basic.consume");

    long done = 0;
    uint64_t published = 0, confirmed = 0;
    amqp_envelope_t *batch = calloc((size_t)max_batch, sizeof *batch);
    if (!batch) die("calloc");
    while (done < count) {
        int n = 0;
        struct timeval zero = {0, 0};
        // Block for the first delivery, then take whatever else has already arrived.
        amqp_maybe_release_buffers(conn);
        amqp_rpc_reply_t r = amqp_consume_message(conn, &batch[n], NULL, 0);
        if (r.reply_type != AMQP_RESPONSE_NORMAL) die("consume");
        n++;
        while (n < max_batch && (amqp_frames_enqueued(conn) || amqp_data_in_buffer(conn))) {
            r = amqp_consume_message(conn, &batch[n], &zero, 0);
            if (r.reply_type != AMQP_RESPONSE_NORMAL) break;
            n++;
        }
        double t = now_s();
        if (!per_event) sqlite3_exec(db, "BEGIN", 0, 0, 0);
        for (int i = 0; i < n; i++) {
            amqp_bytes_t id = batch[i].message.properties.message_id;
            sqlite3_bind_text(insert, 1, id.bytes, (int)id.len, SQLITE_TRANSIENT);
            sqlite3_bind_double(insert, 2, t);
            sqlite3_step(insert);
            sqlite3_reset(insert);
        }
        if (!per_event) sqlite3_exec(db, "COMMIT", 0, 0, 0);
        if (!is_sink) {
            for (int i = 0; i < n; i++) {
                amqp_basic_properties_t props = batch[i].message.properties;
                char next_id[40];
                derived_id(next_id, props.message_id, next);
                // The event's CloudEvents headers go on, with its new id and the input as its cause, as a
                // hand-written CloudEvents hop would send them (and as large as a Choreo hop's).
                amqp_table_entry_t entries[MAX_HEADERS];
                amqp_table_t headers = {0, entries};
                int has_cause = 0;
                if (props._flags & AMQP_BASIC_HEADERS_FLAG) {
                    for (int h = 0; h < props.headers.num_entries && headers.num_entries < MAX_HEADERS - 1; h++) {
                        amqp_table_entry_t e = props.headers.entries[h];
                        if (bytes_equal(e.key, "cloudEvents_id")) e.value.value.bytes = amqp_cstring_bytes(next_id);
                        if (bytes_equal(e.key, "cloudEvents_causationid")) {
                            e.value.value.bytes = props.message_id;
                            has_cause = 1;
                        }
                        entries[headers.num_entries++] = e;
                    }
                    if (!has_cause) {
                        amqp_table_entry_t *e = &entries[headers.num_entries++];
                        e->key = amqp_cstring_bytes("cloudEvents_causationid");
                        e->value.kind = AMQP_FIELD_KIND_UTF8;
                        e->value.value.bytes = props.message_id;
                    }
                }
                props._flags = (props._flags & (AMQP_BASIC_HEADERS_FLAG | AMQP_BASIC_TYPE_FLAG | AMQP_BASIC_TIMESTAMP_FLAG)) |
                               AMQP_BASIC_DELIVERY_MODE_FLAG | AMQP_BASIC_CONTENT_TYPE_FLAG | AMQP_BASIC_MESSAGE_ID_FLAG;
                props.headers = headers;
                props.delivery_mode = 2;
                props.content_type = amqp_cstring_bytes("application/json");
                props.message_id = amqp_cstring_bytes(next_id);
                if (amqp_basic_publish(pconn, 1, amqp_cstring_bytes(exchange), amqp_cstring_bytes(next), 0, 0, &props,
                                       batch[i].message.body) != AMQP_STATUS_OK) die("publish");
                published++;
            }
            while (confirmed < published) {
                amqp_frame_t f;
                amqp_maybe_release_buffers(pconn);
                if (amqp_simple_wait_frame(pconn, &f) != AMQP_STATUS_OK) die("wait confirm");
                if (f.frame_type != AMQP_FRAME_METHOD) continue;
                if (f.payload.method.id == AMQP_BASIC_ACK_METHOD) {
                    amqp_basic_ack_t *a = f.payload.method.decoded;
                    confirmed = a->multiple ? a->delivery_tag : confirmed + 1;
                }
            }
        } else if (lat) {
            for (int i = 0; i < n; i++) {
                amqp_bytes_t b = batch[i].message.body;
                char buf[256];
                size_t len = b.len < sizeof buf - 1 ? b.len : sizeof buf - 1;
                memcpy(buf, b.bytes, len);
                buf[len] = 0;
                char *p = strstr(buf, "\"sentAt\":");
                if (p) fprintf(lat, "%.0f\n", (t - atof(p + 9)) * 1e6);
            }
            fflush(lat);
        }
        amqp_basic_ack(conn, 1, batch[n - 1].delivery_tag, 1);
        for (int i = 0; i < n; i++) amqp_destroy_envelope(&batch[i]);
        done += n;
    }
    amqp_channel_close(conn, 1, AMQP_REPLY_SUCCESS);
    amqp_connection_close(conn, AMQP_REPLY_SUCCESS);
    amqp_destroy_connection(conn);
    amqp_connection_close(pconn, AMQP_REPLY_SUCCESS);
    amqp_destroy_connection(pconn);
    free(batch);
    if (lat) fclose(lat);
    sqlite3_finalize(insert);
    sqlite3_close(db);
    return 0;
}
