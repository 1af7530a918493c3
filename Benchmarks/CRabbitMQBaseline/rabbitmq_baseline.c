#include "rabbitmq_baseline.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#if __has_include(<rabbitmq-c/amqp.h>)
#include <rabbitmq-c/amqp.h>
#include <rabbitmq-c/tcp_socket.h>
#else
#include <amqp.h>
#include <amqp_tcp_socket.h>
#endif

static double now_seconds(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
}

static int failed(amqp_rpc_reply_t reply, const char *what, char *error, int error_len) {
    if (reply.reply_type == AMQP_RESPONSE_NORMAL) return 0;
    snprintf(error, (size_t)error_len, "%s failed (reply type %d, library error %d)", what, (int)reply.reply_type,
             reply.library_error);
    return 1;
}

static amqp_connection_state_t open_connection(const char *host, int port, const char *user, const char *password,
                                               char *error, int error_len) {
    amqp_connection_state_t conn = amqp_new_connection();
    amqp_socket_t *socket = amqp_tcp_socket_new(conn);
    if (!socket || amqp_socket_open(socket, host, port) != AMQP_STATUS_OK) {
        snprintf(error, (size_t)error_len, "cannot connect to %s:%d", host, port);
        amqp_destroy_connection(conn);
        return NULL;
    }
    if (failed(amqp_login(conn, "/", 0, 131072, 30, AMQP_SASL_METHOD_PLAIN, user, password), "login", error, error_len) ||
        (amqp_channel_open(conn, 1), failed(amqp_get_rpc_reply(conn), "channel.open", error, error_len))) {
        amqp_destroy_connection(conn);
        return NULL;
    }
    return conn;
}

static void close_connection(amqp_connection_state_t conn) {
    amqp_channel_close(conn, 1, AMQP_REPLY_SUCCESS);
    amqp_connection_close(conn, AMQP_REPLY_SUCCESS);
    amqp_destroy_connection(conn);
}

double choreo_baseline_publish(const char *host, int port, const char *user, const char *password,
                               const char *queue, int count, int size, int batch,
                               char *error, int error_len) {
    amqp_connection_state_t conn = open_connection(host, port, user, password, error, error_len);
    if (!conn) return -1;
    amqp_confirm_select(conn, 1);
    if (failed(amqp_get_rpc_reply(conn), "confirm.select", error, error_len)) { close_connection(conn); return -1; }

    char *payload = malloc((size_t)size);
    memset(payload, 'x', (size_t)size);
    amqp_bytes_t body = {(size_t)size, payload};
    amqp_basic_properties_t props;
    props._flags = AMQP_BASIC_DELIVERY_MODE_FLAG | AMQP_BASIC_CONTENT_TYPE_FLAG;
    props.delivery_mode = 2;
    props.content_type = amqp_cstring_bytes("application/octet-stream");
    amqp_bytes_t routing_key = amqp_cstring_bytes(queue);

    double start = now_seconds();
    uint64_t published = 0, confirmed = 0;
    int ok = 1;
    while (published < (uint64_t)count && ok) {
        int n = batch;
        if (published + (uint64_t)n > (uint64_t)count) n = (int)((uint64_t)count - published);
        for (int i = 0; i < n; i++) {
            if (amqp_basic_publish(conn, 1, amqp_empty_bytes, routing_key, 0, 0, &props, body) != AMQP_STATUS_OK) {
                snprintf(error, (size_t)error_len, "basic.publish failed");
                ok = 0;
                break;
            }
            published++;
        }
        // rabbitmq-c 0.11 has no confirm-wait helper: read basic.ack frames until the batch is confirmed.
        while (ok && confirmed < published) {
            amqp_frame_t frame;
            if (amqp_simple_wait_frame(conn, &frame) != AMQP_STATUS_OK) {
                snprintf(error, (size_t)error_len, "waiting for confirms failed");
                ok = 0;
                break;
            }
            if (frame.frame_type != AMQP_FRAME_METHOD) continue;
            if (frame.payload.method.id == AMQP_BASIC_ACK_METHOD) {
                amqp_basic_ack_t *ack = frame.payload.method.decoded;
                confirmed = ack->multiple ? ack->delivery_tag : confirmed + 1;
            } else if (frame.payload.method.id == AMQP_BASIC_NACK_METHOD) {
                snprintf(error, (size_t)error_len, "broker nacked a publish");
                ok = 0;
            }
            amqp_maybe_release_buffers(conn);
        }
    }
    double elapsed = now_seconds() - start;
    free(payload);
    close_connection(conn);
    return ok ? (double)count / elapsed : -1;
}

double choreo_baseline_consume(const char *host, int port, const char *user, const char *password,
                               const char *queue, int count, int prefetch,
                               char *error, int error_len) {
    amqp_connection_state_t conn = open_connection(host, port, user, password, error, error_len);
    if (!conn) return -1;
    amqp_basic_qos(conn, 1, 0, (uint16_t)prefetch, 0);
    if (failed(amqp_get_rpc_reply(conn), "basic.qos", error, error_len)) { close_connection(conn); return -1; }
    amqp_basic_consume(conn, 1, amqp_cstring_bytes(queue), amqp_empty_bytes, 0, 0, 0, amqp_empty_table);
    if (failed(amqp_get_rpc_reply(conn), "basic.consume", error, error_len)) { close_connection(conn); return -1; }

    double start = now_seconds();
    int received = 0, ok = 1;
    while (received < count) {
        amqp_envelope_t envelope;
        amqp_maybe_release_buffers(conn);
        amqp_rpc_reply_t reply = amqp_consume_message(conn, &envelope, NULL, 0);
        if (reply.reply_type != AMQP_RESPONSE_NORMAL) {
            snprintf(error, (size_t)error_len, "consume failed (library error %d)", reply.library_error);
            ok = 0;
            break;
        }
        amqp_basic_ack(conn, 1, envelope.delivery_tag, 0);
        amqp_destroy_envelope(&envelope);
        received++;
    }
    double elapsed = now_seconds() - start;
    close_connection(conn);
    return ok ? (double)count / elapsed : -1;
}
