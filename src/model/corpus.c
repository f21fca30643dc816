/*
 * corpus.c - the built-in training corpus: English-like stories generated from a small grammar with a seeded
 * RNG. Written for this project (no outside text), so it can be redistributed with it, and deterministic, so
 * every machine trains on the same bytes without shipping a data file.
 *
 * It has structure at several ranges for a small model to learn: spelling and word frequencies, agreement
 * inside a sentence (a name and its pronoun), facts that persist through a paragraph (where each character
 * lives and what they carry), and a little arithmetic.
 */
#include "model.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

typedef struct buf {
    char *p;
    int64_t n, cap;
} buf;

static void put(buf *b, const char *s) {
    size_t k = strlen(s);
    if (b->n + (int64_t)k + 1 > b->cap) return; /* the caller sized the buffer with slack */
    memcpy(b->p + b->n, s, k);
    b->n += (int64_t)k;
    b->p[b->n] = 0;
}

static const char *const names[] = {"Ada", "Bruno", "Clara", "Dmitri", "Elena", "Farid", "Greta", "Hugo",
                                    "Iris", "Jonas", "Kira", "Luca", "Mina", "Nils", "Olga", "Pavel"};
static const int female[] = {1, 0, 1, 0, 1, 0, 1, 0, 1, 0, 1, 0, 1, 0, 1, 0};
static const char *const places[] = {"the old mill", "the harbour", "the library", "the market", "the forest",
                                     "the bakery", "the hill", "the river", "the school", "the tower"};
static const char *const things[] = {"a lantern", "a map", "a basket of apples", "a red kite", "a small drum",
                                     "a letter", "a wooden box", "a blue scarf", "a loaf of bread", "a compass"};
static const char *const weather[] = {"The morning was cold and bright.", "It rained all day.",
                                      "A warm wind came from the sea.", "Snow fell on the roofs.",
                                      "The sky was grey and quiet.", "The sun was low and golden."};
static const char *const verbs_go[] = {"walked to", "ran to", "went back to", "hurried to", "wandered to"};
static const char *const feelings[] = {"happy", "tired", "curious", "worried", "proud", "hungry"};
static const char *const numbers[] = {"zero", "one", "two", "three", "four", "five", "six", "seven", "eight",
                                      "nine", "ten", "eleven", "twelve"};

#define PICK(arr, s) arr[moda_rng_next(s) % (sizeof arr / sizeof arr[0])]

static void story(buf *b, uint64_t *s) {
    char line[512];
    int a = (int)(moda_rng_next(s) % 16), c = (int)((a + 1 + moda_rng_next(s) % 15) % 16);
    const char *pa = female[a] ? "She" : "He", *pc = female[c] ? "she" : "he";
    const char *home = PICK(places, s), *item = PICK(things, s), *dest = PICK(places, s);
    put(b, PICK(weather, s));
    snprintf(line, sizeof line, " %s lived near %s. %s had %s.", names[a], home, pa, item);
    put(b, line);
    snprintf(line, sizeof line, " One day %s %s %s, where %s met %s.", names[a], PICK(verbs_go, s), dest,
             female[a] ? "she" : "he", names[c]);
    put(b, line);
    int turns = 2 + (int)(moda_rng_next(s) % 3);
    for (int k = 0; k < turns; k++) {
        switch (moda_rng_next(s) % 5) {
        case 0:
            snprintf(line, sizeof line, " \"Where do you live?\" asked %s. \"Near %s,\" said %s.", names[c], home, names[a]);
            break;
        case 1:
            snprintf(line, sizeof line, " %s showed %s %s, and %s was %s.", names[a], names[c], item, pc, PICK(feelings, s));
            break;
        case 2: {
            int x = (int)(moda_rng_next(s) % 7), y = (int)(moda_rng_next(s) % 6);
            snprintf(line, sizeof line, " %s counted %s birds and %s boats: %s and %s make %s.", names[c], numbers[x],
                     numbers[y], numbers[x], numbers[y], numbers[x + y]);
            break;
        }
        case 3:
            snprintf(line, sizeof line, " Together they walked from %s to %s.", dest, home);
            break;
        default:
            snprintf(line, sizeof line, " %s felt %s, so %s sat down by %s.", names[a], PICK(feelings, s),
                     female[a] ? "she" : "he", dest);
            break;
        }
        put(b, line);
    }
    snprintf(line, sizeof line, " In the evening %s went home to %s with %s.\n\n", names[a], home, item);
    put(b, line);
}

static void sums(buf *b, uint64_t *s) {
    char line[128];
    int n = 3 + (int)(moda_rng_next(s) % 4);
    for (int k = 0; k < n; k++) {
        int x = (int)(moda_rng_next(s) % 50), y = (int)(moda_rng_next(s) % 50);
        snprintf(line, sizeof line, "%d + %d = %d\n", x, y, x + y);
        put(b, line);
    }
    put(b, "\n");
}

char *moda_corpus_generate(int64_t bytes, uint64_t seed, int64_t *len) {
    buf b = {NULL, 0, bytes + 4096};
    b.p = malloc((size_t)b.cap);
    if (!b.p) return NULL;
    b.p[0] = 0;
    uint64_t s = seed;
    while (b.n < bytes) {
        if (moda_rng_next(&s) % 6 == 0) sums(&b, &s);
        else story(&b, &s);
    }
    *len = b.n;
    return b.p;
}
