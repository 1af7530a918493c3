#ifndef CHOREO_RABBITMQ_BASELINE_H
#define CHOREO_RABBITMQ_BASELINE_H

// The same operations as the Swift benchmark, written directly against rabbitmq-c: the baseline that
// ChoreoAMQP's throughput is compared with. Each returns messages per second, or a negative value on error
// (with a message in `error`, at most error_len bytes).

double choreo_baseline_publish(const char *host, int port, const char *user, const char *password,
                               const char *queue, int count, int size, int batch,
                               char *error, int error_len);

double choreo_baseline_consume(const char *host, int port, const char *user, const char *password,
                               const char *queue, int count, int prefetch,
                               char *error, int error_len);

#endif
