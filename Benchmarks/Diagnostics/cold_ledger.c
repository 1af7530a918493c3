// What a hop's ledger write costs when it comes alone, as an event does at 200/s: each variant's write
// after a 5 ms sleep, the variants interleaved so that the machine's drift touches them alike, each in
// its own WAL file (synchronous=NORMAL) already holding 50,000 keys.
//   - the C hop's write: one row, autocommit (Benchmarks/ChainBaselineC);
//   - Choreo's completion with one emitted event (schema v4): BEGIN, the key's row, the outbox row, COMMIT;
//   - the same two rows in one INSERT, autocommit;
//   - the completion on a WITHOUT ROWID table;
//   - the completion with locking_mode=EXCLUSIVE (no lock calls, but no second connection either).
//   cc -O2 -o /tmp/cold_ledger Benchmarks/Diagnostics/cold_ledger.c -lsqlite3 && /tmp/cold_ledger
#include <sqlite3.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "probe.h"

#define ROUNDS 1500
#define PREFILL 50000

enum variant { C_HOP, COMPLETION, ONE_INSERT, WITHOUT_ROWID, EXCLUSIVE, VARIANTS };

static const char *names[VARIANTS] = {
    "C hop: one row, autocommit",
    "completion: BEGIN, 2 inserts, COMMIT",
    "completion: one 2-row INSERT",
    "completion, WITHOUT ROWID table",
    "completion, locking_mode=EXCLUSIVE",
};

static const char *columns =
    "handler TEXT NOT NULL, key TEXT NOT NULL, idx INTEGER NOT NULL, completed_at REAL NOT NULL, "
    "published INTEGER NOT NULL, attempts INTEGER, exchange TEXT, routing_key TEXT, attributes TEXT, data BLOB";
static const char *insert_key = "INSERT INTO completion(handler, key, idx, completed_at, published, attempts) "
                                "VALUES (?, ?, -1, ?, 1, ?) ON CONFLICT DO NOTHING";
static const char *insert_outbox = "INSERT INTO completion(handler, key, idx, completed_at, published, exchange, "
                                   "routing_key, attributes, data) VALUES (?, ?, ?, ?, 0, ?, ?, ?, ?)";
static const char *insert_both =
    "INSERT INTO completion(handler, key, idx, completed_at, published, attempts, exchange, routing_key, "
    "attributes, data) VALUES (?, ?, -1, ?, 1, ?, NULL, NULL, NULL, NULL), (?, ?, ?, ?, 0, NULL, ?, ?, ?, ?)";

struct ledger {
    sqlite3 *db;
    sqlite3_stmt *first, *second, *begin, *commit;
};

static struct ledger ledgers[VARIANTS];
static char attributes[400]; // about what a Choreo outbox row's attribute JSON holds
static unsigned char data[80];
static double took[VARIANTS][ROUNDS];

static void exec(sqlite3 *db, const char *sql) {
    char *error = NULL;
    if (sqlite3_exec(db, sql, NULL, NULL, &error) != SQLITE_OK) {
        fprintf(stderr, "%s: %s\n", sql, error);
        exit(1);
    }
}

static sqlite3_stmt *prepare(sqlite3 *db, const char *sql) {
    sqlite3_stmt *statement;
    if (sqlite3_prepare_v2(db, sql, -1, &statement, NULL) != SQLITE_OK) {
        fprintf(stderr, "%s: %s\n", sql, sqlite3_errmsg(db));
        exit(1);
    }
    return statement;
}

static void step(sqlite3_stmt *statement) {
    int rc = sqlite3_step(statement);
    if (rc != SQLITE_DONE) {
        fprintf(stderr, "step: %s\n", sqlite3_errstr(rc));
        exit(1);
    }
    sqlite3_reset(statement);
}

// Binds the key's row to parameters first..first+3 and the outbox row to first+4..first+11 of one statement.
static void bind_rows(sqlite3_stmt *key_row, sqlite3_stmt *outbox_row, int first, const char *key, double at) {
    sqlite3_bind_text(key_row, first, "a", -1, SQLITE_STATIC);
    sqlite3_bind_text(key_row, first + 1, key, -1, SQLITE_TRANSIENT);
    sqlite3_bind_double(key_row, first + 2, at);
    sqlite3_bind_int(key_row, first + 3, 1);
    int o = outbox_row == key_row ? first + 4 : 1;
    sqlite3_bind_text(outbox_row, o, "a", -1, SQLITE_STATIC);
    sqlite3_bind_text(outbox_row, o + 1, key, -1, SQLITE_TRANSIENT);
    sqlite3_bind_int(outbox_row, o + 2, 0);
    sqlite3_bind_double(outbox_row, o + 3, at);
    sqlite3_bind_text(outbox_row, o + 4, "bench", -1, SQLITE_STATIC);
    sqlite3_bind_text(outbox_row, o + 5, "b.event", -1, SQLITE_STATIC);
    sqlite3_bind_text(outbox_row, o + 6, attributes, -1, SQLITE_TRANSIENT);
    sqlite3_bind_blob(outbox_row, o + 7, data, sizeof data, SQLITE_TRANSIENT);
}

// One event's ledger write; `in_transaction` leaves out BEGIN and COMMIT (the prefill batches them).
static void write_one(enum variant v, const char *key, double at, int in_transaction) {
    struct ledger *l = &ledgers[v];
    switch (v) {
    case C_HOP:
        sqlite3_bind_text(l->first, 1, key, -1, SQLITE_TRANSIENT);
        sqlite3_bind_double(l->first, 2, at);
        step(l->first);
        break;
    case ONE_INSERT:
        bind_rows(l->first, l->first, 1, key, at);
        step(l->first);
        break;
    default:
        if (!in_transaction) step(l->begin);
        bind_rows(l->first, l->second, 1, key, at);
        step(l->first);
        if (sqlite3_changes(l->db) == 1) step(l->second);
        if (!in_transaction) step(l->commit);
        break;
    }
}

static void open_ledger(enum variant v) {
    struct ledger *l = &ledgers[v];
    char path[64], side[80];
    snprintf(path, sizeof path, "/var/tmp/cold_ledger_%d.sqlite", v);
    unlink(path);
    snprintf(side, sizeof side, "%s-wal", path);
    unlink(side);
    snprintf(side, sizeof side, "%s-shm", path);
    unlink(side);
    if (sqlite3_open(path, &l->db) != SQLITE_OK) {
        fprintf(stderr, "open %s: %s\n", path, sqlite3_errmsg(l->db));
        exit(1);
    }
    exec(l->db, "PRAGMA journal_mode=WAL; PRAGMA synchronous=NORMAL; PRAGMA cache_size=-65536");
    if (v == EXCLUSIVE) exec(l->db, "PRAGMA locking_mode=EXCLUSIVE");
    char create[1024];
    switch (v) {
    case C_HOP:
        exec(l->db, "CREATE TABLE ledger(id TEXT PRIMARY KEY, at REAL)");
        l->first = prepare(l->db, "INSERT OR IGNORE INTO ledger VALUES (?, ?)");
        return;
    case WITHOUT_ROWID:
        snprintf(create, sizeof create, "CREATE TABLE completion(%s, PRIMARY KEY(handler, key, idx)) WITHOUT ROWID",
                 columns);
        exec(l->db, create);
        break;
    default:
        snprintf(create, sizeof create, "CREATE TABLE completion(%s)", columns);
        exec(l->db, create);
        exec(l->db, "CREATE UNIQUE INDEX completion_key ON completion(handler, key, idx)");
        break;
    }
    if (v == ONE_INSERT) {
        l->first = prepare(l->db, insert_both);
        return;
    }
    l->first = prepare(l->db, insert_key);
    l->second = prepare(l->db, insert_outbox);
    l->begin = prepare(l->db, "BEGIN");
    l->commit = prepare(l->db, "COMMIT");
}

int main(void) {
    memset(attributes, 'x', sizeof attributes - 1);
    memset(data, 'y', sizeof data);
    for (int v = 0; v < VARIANTS; v++) {
        open_ledger(v);
        exec(ledgers[v].db, "BEGIN");
        for (int i = 0; i < PREFILL; i++) {
            char key[64];
            snprintf(key, sizeof key, "%08lx-%04lx-prefill-%d", random(), random() & 0xffff, i);
            write_one(v, key, i, 1);
        }
        exec(ledgers[v].db, "COMMIT");
        exec(ledgers[v].db, "PRAGMA wal_checkpoint(TRUNCATE)");
    }
    for (int i = 0; i < ROUNDS; i++) {
        for (int v = 0; v < VARIANTS; v++) {
            usleep(5000);
            char key[64];
            snprintf(key, sizeof key, "%08lx-%04lx-%04lx-%d", random(), random() & 0xffff, random() & 0xffff, i);
            double start = now_ns();
            write_one(v, key, start, 0);
            took[v][i] = now_ns() - start;
        }
    }
    for (int v = 0; v < VARIANTS; v++) {
        qsort(took[v], ROUNDS, sizeof(double), by_value);
        printf("%-40s p50 %6.1f us   p90 %6.1f us\n", names[v], took[v][ROUNDS / 2] / 1000,
               took[v][ROUNDS * 9 / 10] / 1000);
    }
    return 0;
}
