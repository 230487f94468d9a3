/* Saves and loads blocks through a running kvtier agent with libkvtier, zero-copy included,
 * and checks the error paths. Usage: roundtrip SOCKET. Exit 0 when every check holds. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "kvtier.h"

static int failures = 0;

#define CHECK(cond, ...)                                  \
  do {                                                    \
    if (!(cond)) {                                        \
      fprintf(stderr, "FAIL %s:%d: ", __FILE__, __LINE__); \
      fprintf(stderr, __VA_ARGS__);                       \
      fprintf(stderr, " (last error: %s)\n", kvtier_last_error()); \
      failures++;                                         \
    }                                                     \
  } while (0)

#define N 8

static kvtier_hash make_hash(unsigned i) {
  kvtier_hash h;
  memset(&h, 0, sizeof h);
  h.len = 32;
  for (unsigned b = 0; b < 32; b++) h.bytes[b] = (unsigned char)(i * 31 + b);
  return h;
}

static void fill(unsigned char *p, size_t len, unsigned seed) {
  unsigned x = seed * 2654435761u + 1;
  for (size_t i = 0; i < len; i++) {
    x ^= x << 13; x ^= x >> 17; x ^= x << 5;
    p[i] = (unsigned char)x;
  }
}

int main(int argc, char **argv) {
  if (argc != 2) {
    fprintf(stderr, "usage: %s SOCKET\n", argv[0]);
    return 2;
  }
  CHECK(kvtier_abi_version() == KVTIER_ABI_VERSION, "ABI version %u", kvtier_abi_version());

  kvtier_namespace_spec spec;
  memset(&spec, 0, sizeof spec);
  spec.model = "test/model";
  spec.kv_dtype = "bfloat16";
  spec.block_size = 16;
  spec.pp_stage = -1;
  spec.kv_group = -1;
  kvtier_namespace ns, other;
  CHECK(kvtier_namespace_build(&spec, &ns) == KVTIER_OK, "namespace");
  spec.tenant = "someone-else";
  CHECK(kvtier_namespace_build(&spec, &other) == KVTIER_OK, "namespace 2");
  CHECK(memcmp(&ns, &other, sizeof ns) != 0, "tenants must not share a namespace");
  spec.model = NULL;
  CHECK(kvtier_namespace_build(&spec, &other) == KVTIER_ERR_INVALID_ARGUMENT, "model required");

  /* Error path: no agent there. */
  kvtier_client *nobody = NULL;
  CHECK(kvtier_connect("/nonexistent/kvtier.sock", 200, 0, &nobody) == KVTIER_ERR_UNAVAILABLE,
        "connecting to a missing socket");
  CHECK(strstr(kvtier_last_error(), "/nonexistent/kvtier.sock") != NULL, "error names the socket");
  CHECK(nobody == NULL, "no handle on failure");

  kvtier_client *c = NULL;
  CHECK(kvtier_connect(argv[1], 2000, 0, &c) == KVTIER_OK, "connect");
  if (!c) return 1;

  /* Save N blocks of different lengths, then load them back byte for byte. */
  kvtier_hash hashes[N];
  unsigned char *blocks[N];
  size_t lens[N];
  const void *data[N];
  for (unsigned i = 0; i < N; i++) {
    hashes[i] = make_hash(i);
    lens[i] = 4096 * (i + 1) + i;
    blocks[i] = malloc(lens[i]);
    fill(blocks[i], lens[i], i);
    data[i] = blocks[i];
  }
  unsigned char outcomes[N];
  CHECK(kvtier_save(c, &ns, hashes, data, lens, N, outcomes) == KVTIER_OK, "save");
  for (unsigned i = 0; i < N; i++) CHECK(outcomes[i] == KVTIER_SAVE_STORED, "block %u stored: %u", i, outcomes[i]);
  CHECK(kvtier_save(c, &ns, hashes, data, lens, N, outcomes) == KVTIER_OK, "save again");
  CHECK(outcomes[0] == KVTIER_SAVE_EXISTS, "second save finds it");

  size_t matched = 0;
  unsigned char tiers[N + 1];
  kvtier_hash probe[N + 1];
  memcpy(probe, hashes, sizeof hashes);
  probe[N] = make_hash(1000);
  CHECK(kvtier_lookup(c, &ns, probe, N + 1, &matched, tiers) == KVTIER_OK, "lookup");
  CHECK(matched == N, "matched %zu", matched);
  CHECK(tiers[0] == KVTIER_TIER_HOST && tiers[N] == KVTIER_TIER_MISS, "tiers");
  CHECK(kvtier_lookup(c, &other, probe, N, &matched, NULL) == KVTIER_OK && matched == 0,
        "another namespace sees nothing");
  size_t held = 99;
  CHECK(kvtier_hold(c, &ns, probe, N + 1, &matched, &held) == KVTIER_OK, "hold");
  CHECK(matched == N && held == 0, "hold on an agent serving no peers: %zu stored, %zu held", matched, held);
  CHECK(kvtier_hold(c, &ns, probe, N, NULL, NULL) == KVTIER_ERR_INVALID_ARGUMENT, "hold without matched");
  held = 99;
  CHECK(kvtier_hold_under(c, &ns, probe, N, 7, &matched, &held) == KVTIER_OK, "hold under a ticket");
  CHECK(matched == N && held == 0, "ticketed hold on an agent serving no peers: %zu stored, %zu held", matched,
        held);
  size_t ended = 99;
  CHECK(kvtier_unhold(c, &ns, 7, &ended) == KVTIER_OK && ended == 0, "unhold: %zu ended", ended);
  CHECK(kvtier_unhold(c, &ns, 0, NULL) == KVTIER_ERR_INVALID_ARGUMENT, "ticket 0 names no hold");

  void *bufs[N];
  for (unsigned i = 0; i < N; i++) bufs[i] = calloc(1, lens[i]);
  CHECK(kvtier_load(c, &ns, hashes, (void *const *)bufs, lens, N, tiers) == KVTIER_OK, "load");
  for (unsigned i = 0; i < N; i++) {
    CHECK(tiers[i] == KVTIER_TIER_HOST, "block %u tier %u", i, tiers[i]);
    CHECK(memcmp(bufs[i], blocks[i], lens[i]) == 0, "block %u bytes", i);
  }
  /* A buffer of the wrong length is a miss, not a partial copy. */
  size_t short_len = lens[0] - 1;
  CHECK(kvtier_load(c, &ns, hashes, (void *const *)bufs, &short_len, 1, tiers) == KVTIER_OK, "short load");
  CHECK(tiers[0] == KVTIER_TIER_MISS, "short buffer is a miss");

  /* Zero-copy: reserve, write in place, commit; acquire, read in place, release. */
  kvtier_hash zh = make_hash(500);
  size_t zlen = 65536;
  kvtier_slots *slots = NULL;
  CHECK(kvtier_reserve(c, &ns, &zh, &zlen, 1, &slots) == KVTIER_OK, "reserve");
  CHECK(kvtier_slots_count(slots) == 1, "one slot");
  unsigned char code = 99;
  size_t got_len = 0;
  CHECK(kvtier_slots_info(slots, 0, &got_len, &code) == KVTIER_OK && code == KVTIER_SAVE_STORED && got_len == zlen,
        "slot granted");
  unsigned char *p = kvtier_slots_ptr(slots, 0);
  CHECK(p != NULL, "slot pointer");
  if (p) fill(p, zlen, 500);
  CHECK(kvtier_release(c, slots) == KVTIER_ERR_INVALID_ARGUMENT, "reserved slots cannot be released");
  CHECK(kvtier_slots_count(slots) == 1, "a refused release leaves the handle to the caller");
  /* While it is held, the key is busy for everyone else. */
  kvtier_slots *again = NULL;
  CHECK(kvtier_reserve(c, &ns, &zh, &zlen, 1, &again) == KVTIER_OK, "reserve again");
  CHECK(kvtier_slots_info(again, 0, NULL, &code) == KVTIER_OK && code == KVTIER_SAVE_EXISTS, "busy: %u", code);
  CHECK(kvtier_abort(c, again) == KVTIER_OK, "abort empty");
  /* Freeing the handle without a call gives the reservation back on the next call. */
  kvtier_slots_free(slots);
  CHECK(kvtier_lookup(c, &ns, &zh, 1, &matched, NULL) == KVTIER_OK && matched == 0, "not stored");
  CHECK(kvtier_last_error()[0] == '\0', "a success clears the last error");
  again = NULL;
  CHECK(kvtier_reserve(c, &ns, &zh, &zlen, 1, &again) == KVTIER_OK, "reserve after free");
  CHECK(kvtier_slots_ptr(again, 0) != NULL, "the freed reservation was given back");
  CHECK(kvtier_abort(c, again) == KVTIER_OK, "abort");
  /* Closing the connection gives everything back too; reserve, then close while holding it. */
  slots = NULL;
  CHECK(kvtier_reserve(c, &ns, &zh, &zlen, 1, &slots) == KVTIER_OK, "reserve before close");
  kvtier_close(c);
  kvtier_slots_free(slots); /* after its client: no call is made */
  CHECK(kvtier_connect(argv[1], 2000, 1, &c) == KVTIER_OK, "lazy connect");
  slots = NULL;
  CHECK(kvtier_reserve(c, &ns, &zh, &zlen, 1, &slots) == KVTIER_OK, "reserve after close");
  p = kvtier_slots_ptr(slots, 0);
  CHECK(p != NULL, "reservation released with its connection");
  if (p) fill(p, zlen, 500);
  unsigned char committed = 0;
  CHECK(kvtier_commit(c, slots, &committed) == KVTIER_OK && committed == 1, "commit");

  slots = NULL;
  CHECK(kvtier_acquire(c, &ns, &zh, 1, &slots) == KVTIER_OK, "acquire");
  CHECK(kvtier_slots_info(slots, 0, &got_len, &code) == KVTIER_OK && code == KVTIER_TIER_HOST && got_len == zlen,
        "acquired");
  unsigned char *expect = malloc(zlen);
  fill(expect, zlen, 500);
  p = kvtier_slots_ptr(slots, 0);
  CHECK(p && memcmp(p, expect, zlen) == 0, "zero-copy bytes");
  CHECK(kvtier_slots_ptr(slots, 5) == NULL, "out of range index");
  CHECK(kvtier_release(c, slots) == KVTIER_OK, "release");

  /* Argument errors. */
  CHECK(kvtier_save(c, &ns, NULL, data, lens, 1, NULL) == KVTIER_ERR_INVALID_ARGUMENT, "NULL hashes");
  CHECK(strstr(kvtier_last_error(), "hashes") != NULL, "error names the argument: %s", kvtier_last_error());
  kvtier_hash bad = make_hash(1);
  bad.len = 0;
  CHECK(kvtier_lookup(c, &ns, &bad, 1, &matched, NULL) == KVTIER_ERR_INVALID_ARGUMENT, "empty hash");
  CHECK(kvtier_lookup(NULL, &ns, hashes, 1, &matched, NULL) == KVTIER_ERR_INVALID_ARGUMENT, "NULL client");

  char stats[8];
  size_t needed = 0;
  CHECK(kvtier_stats(c, stats, sizeof stats, &needed) == KVTIER_ERR_BUFFER && needed > sizeof stats, "small stats buffer");
  char *big = malloc(needed);
  CHECK(kvtier_stats(c, big, needed, &needed) == KVTIER_OK && strstr(big, "\"host\"") != NULL, "stats");

  kvtier_close(c);
  kvtier_close(NULL);
  for (unsigned i = 0; i < N; i++) { free(blocks[i]); free(bufs[i]); }
  free(expect);
  free(big);
  if (failures) {
    fprintf(stderr, "%d checks failed\n", failures);
    return 1;
  }
  printf("all C checks passed\n");
  return 0;
}
