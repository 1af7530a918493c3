#ifndef CHOREO_CRABBITMQ_SHIM_H
#define CHOREO_CRABBITMQ_SHIM_H

// rabbitmq-c 0.12+ installs its headers under rabbitmq-c/; 0.11 (Debian bookworm) installs them flat.
#if __has_include(<rabbitmq-c/amqp.h>)
#include <rabbitmq-c/amqp.h>
#include <rabbitmq-c/framing.h>
#include <rabbitmq-c/tcp_socket.h>
#include <rabbitmq-c/ssl_socket.h>
#else
#include <amqp.h>
#include <amqp_framing.h>
#include <amqp_tcp_socket.h>
#include <amqp_ssl_socket.h>
#endif

#include <poll.h>
#include <sys/eventfd.h>
#if __has_include(<malloc.h>)
// mallopt, for the handler runtime's allocator settings (Choreo.run); not in Swift's Glibc module.
#include <malloc.h>
#endif

// amqp_login is C-variadic, which Swift cannot call: this wrapper fixes the PLAIN mechanism's arguments.
static inline amqp_rpc_reply_t choreo_amqp_login_plain(amqp_connection_state_t state, const char *vhost,
                                                       int channel_max, int frame_max, int heartbeat,
                                                       amqp_table_t const *client_properties,
                                                       const char *user, const char *password) {
    return amqp_login_with_properties(state, vhost, channel_max, frame_max, heartbeat, client_properties,
                                      AMQP_SASL_METHOD_PLAIN, user, password);
}

// EXTERNAL (client-certificate) login, for amqps:// URLs without a password.
static inline amqp_rpc_reply_t choreo_amqp_login_external(amqp_connection_state_t state, const char *vhost,
                                                          int channel_max, int frame_max, int heartbeat,
                                                          amqp_table_t const *client_properties,
                                                          const char *identity) {
    return amqp_login_with_properties(state, vhost, channel_max, frame_max, heartbeat, client_properties,
                                      AMQP_SASL_METHOD_EXTERNAL, identity);
}

// Method ids and flags as typed constants: the header spells them as cast macros, which Swift does not import.
static const amqp_method_number_t CHOREO_CONNECTION_CLOSE = AMQP_CONNECTION_CLOSE_METHOD;
static const amqp_method_number_t CHOREO_CONNECTION_CLOSE_OK = AMQP_CONNECTION_CLOSE_OK_METHOD;
static const amqp_method_number_t CHOREO_CONNECTION_BLOCKED = AMQP_CONNECTION_BLOCKED_METHOD;
static const amqp_method_number_t CHOREO_CONNECTION_UNBLOCKED = AMQP_CONNECTION_UNBLOCKED_METHOD;
static const amqp_method_number_t CHOREO_CHANNEL_CLOSE = AMQP_CHANNEL_CLOSE_METHOD;
static const amqp_method_number_t CHOREO_CHANNEL_CLOSE_OK = AMQP_CHANNEL_CLOSE_OK_METHOD;
static const amqp_method_number_t CHOREO_CHANNEL_FLOW = AMQP_CHANNEL_FLOW_METHOD;
static const amqp_method_number_t CHOREO_CHANNEL_FLOW_OK = AMQP_CHANNEL_FLOW_OK_METHOD;
static const amqp_method_number_t CHOREO_BASIC_DELIVER = AMQP_BASIC_DELIVER_METHOD;
static const amqp_method_number_t CHOREO_BASIC_PUBLISH = AMQP_BASIC_PUBLISH_METHOD;
static const amqp_method_number_t CHOREO_BASIC_RETURN = AMQP_BASIC_RETURN_METHOD;
static const amqp_method_number_t CHOREO_BASIC_ACK = AMQP_BASIC_ACK_METHOD;
static const amqp_method_number_t CHOREO_BASIC_NACK = AMQP_BASIC_NACK_METHOD;
static const amqp_method_number_t CHOREO_BASIC_CANCEL = AMQP_BASIC_CANCEL_METHOD;
static const amqp_method_number_t CHOREO_BASIC_CANCEL_OK = AMQP_BASIC_CANCEL_OK_METHOD;

static const amqp_flags_t CHOREO_PROP_CONTENT_TYPE = AMQP_BASIC_CONTENT_TYPE_FLAG;
static const amqp_flags_t CHOREO_PROP_CONTENT_ENCODING = AMQP_BASIC_CONTENT_ENCODING_FLAG;
static const amqp_flags_t CHOREO_PROP_HEADERS = AMQP_BASIC_HEADERS_FLAG;
static const amqp_flags_t CHOREO_PROP_DELIVERY_MODE = AMQP_BASIC_DELIVERY_MODE_FLAG;
static const amqp_flags_t CHOREO_PROP_PRIORITY = AMQP_BASIC_PRIORITY_FLAG;
static const amqp_flags_t CHOREO_PROP_CORRELATION_ID = AMQP_BASIC_CORRELATION_ID_FLAG;
static const amqp_flags_t CHOREO_PROP_REPLY_TO = AMQP_BASIC_REPLY_TO_FLAG;
static const amqp_flags_t CHOREO_PROP_EXPIRATION = AMQP_BASIC_EXPIRATION_FLAG;
static const amqp_flags_t CHOREO_PROP_MESSAGE_ID = AMQP_BASIC_MESSAGE_ID_FLAG;
static const amqp_flags_t CHOREO_PROP_TIMESTAMP = AMQP_BASIC_TIMESTAMP_FLAG;
static const amqp_flags_t CHOREO_PROP_TYPE = AMQP_BASIC_TYPE_FLAG;
static const amqp_flags_t CHOREO_PROP_USER_ID = AMQP_BASIC_USER_ID_FLAG;
static const amqp_flags_t CHOREO_PROP_APP_ID = AMQP_BASIC_APP_ID_FLAG;

static const int CHOREO_FRAME_METHOD = AMQP_FRAME_METHOD;
static const int CHOREO_FRAME_HEADER = AMQP_FRAME_HEADER;
static const int CHOREO_FRAME_BODY = AMQP_FRAME_BODY;

// OpenSSL's reason for a failed TLS handshake ("certificate verify failed", "wrong version number"): rabbitmq-c
// reports only that the handshake failed. librabbitmq-dev depends on libssl-dev, so the header is there.
#include <openssl/err.h>

static inline void choreo_tls_clear_errors(void) { ERR_clear_error(); }

// The reason of the newest error in this thread's OpenSSL queue, or NULL.
static inline const char *choreo_tls_last_reason(void) {
    unsigned long code = ERR_peek_last_error();
    return code == 0 ? NULL : ERR_reason_error_string(code);
}

#endif
