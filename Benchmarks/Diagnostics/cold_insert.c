// How much slower the same small piece of work is when it comes alone, as an event does at 200/s: a
// one-row SQLite insert and commit (a C hop's ledger write: WAL, synchronous=NORMAL), timed back to back,
// after a 5 ms sleep, and after 5 ms of spinning.
//   cc -O2 -o /tmp/cold_insert Benchmarks/Diagnostics/cold_insert.c -lsqlite3 && /tmp/cold_insert
#include <sqlite3.h>
#include <stdio.h>
#include <stdlib.h>
#include <time.h>
#include <unistd.h>

#include "probe.h"

#define N 2000

int main(void) {
    const char *path = "/tmp/cold_insert.sqlite";
    unlink(path);
    sqlite3 *db;
    if (sqlite3_open(path, &db) != SQLITE_OK) return 1;
    sqlite3_exec(db, "PRAGMA journal_mode=WAL; PRAGMA synchronous=NORMAL; CREATE TABLE l (id TEXT PRIMARY KEY, at REAL)",
                 0, 0, 0);
    sqlite3_stmt *insert;
    sqlite3_prepare_v2(db, "INSERT OR IGNORE INTO l VALUES (?, ?)", -1, &insert, 0);
    const char *modes[] = {"back to back", "after a 5 ms sleep", "after 5 ms of spinning"};
    static double took[N];
    for (int mode = 0; mode < 3; mode++) {
        for (int i = 0; i < N; i++) {
            if (mode == 1) usleep(5000);
            if (mode == 2) {
                double start = now_ns();
                while (now_ns() - start < 5e6) {}
            }
            char id[64];
            snprintf(id, sizeof id, "%d-%d-%ld", mode, i, random());
            double t = now_ns();
            sqlite3_bind_text(insert, 1, id, -1, SQLITE_TRANSIENT);
            sqlite3_bind_double(insert, 2, t);
            sqlite3_step(insert);
            sqlite3_reset(insert);
            took[i] = now_ns() - t;
        }
        qsort(took, N, sizeof took[0], by_value);
        printf("insert and commit %-24s p50 %6.1f us  p90 %6.1f us\n", modes[mode], took[N / 2] / 1000,
               took[N * 9 / 10] / 1000);
    }
    sqlite3_finalize(insert);
    sqlite3_close(db);
    unlink(path);
    return 0;
}
