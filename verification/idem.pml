/*
 * idem.pml: a Promela model of idem's claim / complete / release protocol for ONE biz-id key,
 * checked with Spin (verification/run_spin.sh names the checks; docs/guarantees.md, "What is
 * model-checked", says what they prove).
 *
 * It models the protocol, not the C++: the store is a handful of variables changed in atomic
 * steps that follow docs/stores/writing-a-store.md (rules 1-3), MemoryStore and the Redis
 * scripts; the consumer is IdempotentConsumer::consume (claim, handler, complete or release,
 * ack when processed or duplicate).
 *
 * Actors
 *   Worker(1..WORKERS)  consumers of one message (COPIES copies of it: a producer retry that
 *                       the broker did not dedup). While a copy is unacked the broker may
 *                       (re)deliver it to any idle worker, also while another worker still
 *                       holds it (a redelivery after a rebalance / ack timeout). A worker can
 *                       crash at any step (at most MAX_CRASH crashes in all): it loses its
 *                       local state and its copy stays unacked. Its handler can throw (at most
 *                       MAX_FAIL times in all).
 *   Env                 time and the store's environment: the lease of a claim whose holder
 *                       is dead (crashed or gone) runs out eventually; the lease of a LIVE
 *                       holder may run out too, i.e. the holder is slow (at most MAX_SLOW
 *                       times); with -DLOSSY a store failover forgets the last write.
 *   Ticker              (LIVENESS only) lets time pass while a copy is unacked, so that a
 *                       deadlock is an infinite run the fairness search can report.
 *
 * Modes (compile-time macros)
 *   default             Mark::after_success with a dedup store (claim with a lease).
 *   MARK_BEFORE         Mark::before_processing: the claim records the key done at once.
 *   INBOX               the transactional inbox: BEGIN, claim (written done inside the
 *                       transaction, which holds the key's row lock until it ends), handler
 *                       writes, COMMIT; a crash or a handler failure rolls both back.
 *   LOSSY               the store may lose its last acknowledged write (Redis failover with
 *                       asynchronous replication), at most MAX_FAILOVER times. The token
 *                       counter (Redis INCR) is lost with it.
 *   LOSSY + WAIT        RedisOptions::wait_replicas: a call returns only after WAIT confirms
 *                       its write; a write lost before that makes the call fail
 *                       (StoreUnavailable: the message is not acked).
 *   MUTANT_NO_FENCE           complete ignores the token (stores any completion).
 *   MUTANT_NO_FENCE_RELEASE   release ignores the token.
 *   MUTANT_EFFECT_OUTSIDE_TX  (with INBOX) the handler's effect is not a write of the
 *                             transaction (an HTTP call, a second database).
 *   LIVENESS            adds the LTL property `live` (run pan -a -f).
 *
 * Properties (each assertion can be switched off, so a must-fail check names the one it is
 * expected to break)
 *   CHECK_EFFECTS  no two effects for the key, unless one of them comes from an attempt that
 *                  crossed the documented duplication window: its holder crashed between its
 *                  effect and its record, its lease ran out while it was still working, or
 *                  (LOSSY+WAIT) its completion failed with StoreUnavailable. Ghost counter:
 *                  effects <= excused + 1. Under MARK_BEFORE and INBOX nothing is excused:
 *                  effects <= 1.
 *   CHECK_FENCE    a complete or release whose token is not the record's never changes the
 *                  record.
 *   CHECK_TOKENS   every token the store hands out is larger than every token it handed out
 *                  before (strictly increasing per key).
 *   live (LTL)     eventually, forever: every copy acked and no live claim left.
 */

#ifndef WORKERS
#define WORKERS 2
#endif
#ifndef COPIES
#define COPIES 1
#endif
#ifndef MAX_CRASH
#define MAX_CRASH 1
#endif
#ifndef MAX_FAIL
#define MAX_FAIL 1
#endif
#ifndef MAX_SLOW
#define MAX_SLOW 1
#endif
#ifndef MAX_FAILOVER
#define MAX_FAILOVER 1
#endif
#if WORKERS < 1 || WORKERS > 3 || COPIES < 1 || COPIES > 2
#error "idem.pml supports 1..3 workers and 1..2 copies"
#endif
#ifndef CHECK_EFFECTS
#define CHECK_EFFECTS 1
#endif
#ifndef CHECK_FENCE
#define CHECK_FENCE 1
#endif
#ifndef CHECK_TOKENS
#define CHECK_TOKENS 1
#endif

/* Record states. HELD: in progress, lease live. EXPIRED: in progress, lease over (a claim
 * takes it over; its token still completes it until then). */
#define ABSENT   0
#define HELD     1
#define EXPIRED  2
#define DONE     3
#define RELEASED 4

/* Worker program counter. */
#define IDLE      0
#define CLAIM     1
#define WAIT_CLAIM 2
#define RUN       3
#define COMMIT    4
#define COMPLETE  5
#define WAIT_DONE 6
#define RELEASE   7
#define ACK       8

/* --- the store: one key ------------------------------------------------------------------ */
byte rec = ABSENT;
byte rec_tok = 0;    /* token of the current or last owner */
byte last_tok = 0;   /* the store's token counter */

#ifdef LOSSY
/* The state before the last write, which a failover brings back. */
byte prev_rec, prev_tok, prev_last, prev_max;
bool unrepl = false; /* the last write is not on the replica (yet) */
byte writer = 0;     /* who made it */
byte failovers = 0;
bool lost_w[4];      /* WAIT: this worker's pending write was lost */
#endif

#ifdef INBOX
byte txlock = 0;     /* worker whose open transaction holds the key's row (0: none) */
#endif

/* --- the broker ---------------------------------------------------------------------------- */
bool acked[COPIES];
#define ALL_ACKED (acked[0] && acked[COPIES - 1])

/* --- budgets ----------------------------------------------------------------------------- */
byte crashes = 0;
byte fails = 0;
byte slow = 0;

/* --- ghosts ------------------------------------------------------------------------------ */
byte effects = 0;     /* handler effects that took place (committed ones, in the inbox) */
byte excused = 0;     /* attempts that crossed the duplication window and made an effect */
byte max_issued = 0;  /* largest token handed out so far */
/* Per worker (index 1..WORKERS; 0 unused): its token, whether it still holds its claim as far
 * as it knows (claimed, not yet completed or released), whether its lease ran out meanwhile,
 * whether it made an effect not yet recorded, whether its attempt was excused. */
byte wtok[4];
bool busy[4];
bool lost[4];
bool pending[4];
bool exc[4];

/* Scratch, zero between steps (not hidden: pan's breadth-first search refuses hidden ones). */
byte h_rec, h_tok, h_w;

#define HOLDER(w) (w <= WORKERS && busy[w] && wtok[w] == rec_tok)
#define HOLDER_ALIVE (HOLDER(1) || HOLDER(2) || HOLDER(3))

#if CHECK_EFFECTS
#if defined(MARK_BEFORE) || defined(INBOX)
#define ASSERT_EFFECTS assert(effects <= 1)
#else
#define ASSERT_EFFECTS assert(effects <= excused + 1)
#endif
#else
#define ASSERT_EFFECTS skip
#endif

#if CHECK_FENCE
/* h_rec/h_tok: the record before the call; t: the caller's token. */
#define ASSERT_FENCED(t) assert(t == h_tok || (rec == h_rec && rec_tok == h_tok))
#else
#define ASSERT_FENCED(t) skip
#endif

#if CHECK_TOKENS
#define ASSERT_TOKEN_RISES(t) assert(t > max_issued)
#else
#define ASSERT_TOKEN_RISES(t) skip
#endif

/* Excuse worker w's attempt (once) if it made an effect that may now happen again. */
inline excuse(w) {
  if
  :: pending[w] && !exc[w] -> excused++; exc[w] = true
  :: else -> skip
  fi
}

/* Before every store write: remember what a failover would bring back. */
inline write_begin(w) {
#ifdef LOSSY
  prev_rec = rec; prev_tok = rec_tok; prev_last = last_tok; prev_max = max_issued;
  unrepl = true; writer = w; lost_w[w] = false
#else
  skip
#endif
}

/* The worker's attempt is over (recorded, refused, released, or the worker crashed): its ghost
 * state is reset, so that states differing only in stale ghosts are one state. */
inline end_attempt(w) {
  busy[w] = false; lost[w] = false; pending[w] = false; exc[w] = false; wtok[w] = 0
}

/* Hands out the next token (claim). */
inline next_token(w) {
  last_tok++;
  wtok[w] = last_tok;
  printf("w%d: claim -> acquired, token %d\n", w, wtok[w]);
  ASSERT_TOKEN_RISES(wtok[w]);
  max_issued = wtok[w]
}

proctype Worker(byte me) {
  byte pc = IDLE;
  byte copy = 0;

  do
  /* The broker delivers an unacked copy. */
  :: atomic {
       pc == IDLE && !ALL_ACKED ->
       if
       :: !acked[0] -> copy = 0
       :: COPIES > 1 && !acked[COPIES - 1] -> copy = COPIES - 1
       fi;
       printf("w%d: delivered copy %d\n", me, copy);
       pc = CLAIM
     }
  :: pc == IDLE && ALL_ACKED -> break

#ifndef INBOX
  /* claim: one atomic step of the store (writing-a-store.md rule 1). */
  :: atomic {
       pc == CLAIM ->
       if
       :: rec == DONE -> printf("w%d: claim -> duplicate\n", me); pc = ACK
       :: rec == HELD ->                   /* not acked, redelivered later */
          printf("w%d: claim -> in_progress\n", me); pc = IDLE; copy = 0
       :: rec == ABSENT || rec == RELEASED || rec == EXPIRED ->
          write_begin(me);
          next_token(me);
          rec_tok = wtok[me];
#ifdef MARK_BEFORE
          rec = DONE;
#else
          rec = HELD;
#endif
          busy[me] = true;
#if defined(LOSSY) && defined(WAIT)
          pc = WAIT_CLAIM
#else
          pc = RUN
#endif
       fi
     }

#if defined(LOSSY) && defined(WAIT)
  /* WAIT after the claim: a lost write makes the claim fail (StoreUnavailable, no ack). */
  :: atomic {
       pc == WAIT_CLAIM ->
       if
       :: lost_w[me] ->
          printf("w%d: WAIT failed, claim lost: StoreUnavailable\n", me);
          lost_w[me] = false; end_attempt(me); pc = IDLE; copy = 0
       :: else ->
          if
          :: unrepl && writer == me -> unrepl = false
          :: else -> skip
          fi;
          pc = RUN
       fi
     }
#endif

  /* The handler: one effect, or it throws. */
  :: atomic {
       pc == RUN ->
       effects++;
       printf("w%d: handler EFFECT (token %d), effects = %d\n", me, wtok[me], effects);
       pending[me] = true;
       if
       :: lost[me] -> excuse(me)   /* a slow holder's late effect */
       :: else -> skip
       fi;
       ASSERT_EFFECTS;
       pc = COMPLETE
     }
  :: atomic {
       pc == RUN && fails < MAX_FAIL ->
       fails++;
       printf("w%d: handler threw\n", me);
#ifdef MARK_BEFORE
       /* before_processing completes a failure too (its record is already done), and does
        * not ack: the message is dropped. */
       end_attempt(me); pc = IDLE; copy = 0
#else
       pc = RELEASE
#endif
     }

  /* complete: fenced by the token (rule 3). Processed is acked whether or not it was
   * recorded (a refused completion is only logged: lease_lost). */
  :: atomic {
       pc == COMPLETE ->
       h_rec = rec; h_tok = rec_tok;
       if
#ifdef MUTANT_NO_FENCE
       :: rec == HELD || rec == EXPIRED || rec == DONE ->
#else
       :: (rec == HELD || rec == EXPIRED || rec == DONE) && rec_tok == wtok[me] ->
#endif
          write_begin(me);
          rec = DONE; rec_tok = wtok[me];
          printf("w%d: complete(token %d) -> recorded\n", me, wtok[me]);
#if defined(LOSSY) && defined(WAIT)
          pc = WAIT_DONE
#else
          pc = ACK
#endif
       :: else ->
          printf("w%d: complete(token %d) -> refused (lease lost)\n", me, wtok[me]);
          pc = ACK
       fi;
       ASSERT_FENCED(wtok[me]);
       h_rec = 0; h_tok = 0;
       if
       :: pc == WAIT_DONE -> busy[me] = false   /* the effect stays pending until WAIT */
       :: else -> end_attempt(me)
       fi
     }

#if defined(LOSSY) && defined(WAIT)
  /* WAIT after the completion: a lost write fails the call (StoreUnavailable): not acked, the
   * effect is unrecorded - the window of a crash between effect and record. */
  :: atomic {
       pc == WAIT_DONE ->
       if
       :: lost_w[me] ->
          printf("w%d: WAIT failed, completion lost: StoreUnavailable\n", me);
          lost_w[me] = false; excuse(me); end_attempt(me); pc = IDLE; copy = 0
       :: else ->
          if
          :: unrepl && writer == me -> unrepl = false
          :: else -> skip
          fi;
          end_attempt(me); pc = ACK
       fi
     }
#endif

  /* release after a handler failure: fenced by the token; the message is not acked. */
  :: atomic {
       pc == RELEASE ->
       h_rec = rec; h_tok = rec_tok;
       if
#ifdef MUTANT_NO_FENCE_RELEASE
       :: rec == HELD || rec == EXPIRED ->
#else
       :: (rec == HELD || rec == EXPIRED) && rec_tok == wtok[me] ->
#endif
          write_begin(me); rec = RELEASED;
          printf("w%d: release(token %d) -> released\n", me, wtok[me])
       :: else -> printf("w%d: release(token %d) -> refused\n", me, wtok[me])
       fi;
       ASSERT_FENCED(wtok[me]);
       h_rec = 0; h_tok = 0;
       end_attempt(me); pc = IDLE; copy = 0
     }

#else /* INBOX */
  /* BEGIN and claim inside the transaction: waits while another transaction holds the key's
   * row; a committed done record makes a duplicate (nothing to commit). Otherwise the record
   * is written done, uncommitted. */
  :: atomic {
       pc == CLAIM && txlock == 0 ->
       if
       :: rec == DONE -> printf("w%d: claim -> duplicate\n", me); pc = ACK
       :: else ->
          txlock = me; next_token(me); pc = RUN
       fi
     }

  /* The handler's writes, in the transaction. */
  :: atomic {
       pc == RUN ->
#ifdef MUTANT_EFFECT_OUTSIDE_TX
       effects++;
       printf("w%d: handler EFFECT outside the transaction, effects = %d\n", me, effects);
       ASSERT_EFFECTS;
#endif
       pc = COMMIT
     }
  /* The handler threw: roll back its savepoint and undo the claim (its token is burned),
   * commit nothing; failed, not acked. */
  :: atomic {
       pc == RUN && fails < MAX_FAIL ->
       printf("w%d: handler threw, ROLLBACK\n", me);
       fails++; txlock = 0; wtok[me] = 0; pc = IDLE; copy = 0
     }

  /* COMMIT: the record and the handler's writes become durable together. */
  :: atomic {
       pc == COMMIT ->
       rec = DONE; rec_tok = wtok[me];
#ifndef MUTANT_EFFECT_OUTSIDE_TX
       effects++;
#endif
       printf("w%d: COMMIT (record + effect), effects = %d\n", me, effects);
       ASSERT_EFFECTS;
       txlock = 0; wtok[me] = 0; pc = ACK
     }
#endif /* INBOX */

  :: atomic {
       pc == ACK ->
       printf("w%d: ack copy %d\n", me, copy);
       acked[copy] = true; pc = IDLE; copy = 0
     }

  /* A crash at any step: local state is gone, the copy stays unacked (redelivered). An open
   * transaction rolls back; a claim in the store stays until its lease runs out. */
  :: atomic {
       pc != IDLE && crashes < MAX_CRASH ->
       crashes++;
       printf("w%d: CRASH\n", me);
       excuse(me);
       end_attempt(me);
#ifdef INBOX
       if
       :: txlock == me -> txlock = 0
       :: else -> skip
       fi;
#endif
       pc = IDLE; copy = 0
     }
  od
}

active proctype Env() {
end:
  do
  /* The lease of a claim nobody works on any more runs out (eventually: time passes). */
  :: atomic {
       rec == HELD && !HOLDER_ALIVE ->
       printf("env: lease of token %d expires (holder gone)\n", rec_tok);
       rec = EXPIRED
     }
  /* The lease of a live holder runs out: it is slower than the lease. */
  :: atomic {
       rec == HELD && HOLDER_ALIVE && slow < MAX_SLOW ->
       slow++;
       printf("env: lease of token %d expires while its holder still works\n", rec_tok);
       h_w = 1;
       do
       :: h_w > WORKERS -> break
       :: h_w <= WORKERS ->
          if
          :: HOLDER(h_w) -> lost[h_w] = true; excuse(h_w)
          :: else -> skip
          fi;
          h_w++
       od;
       h_w = 0;
       rec = EXPIRED
     }
#ifdef LOSSY
  /* Failover: the new primary never got the last write (nor its token increment). Under
   * WAIT, a write is lost only before its WAIT returned: its caller fails and never uses
   * what it wrote, so the ghost max_issued goes back too. */
  :: atomic {
       unrepl && failovers < MAX_FAILOVER ->
       failovers++;
       printf("env: FAILOVER, the store forgets its last write\n");
       rec = prev_rec; rec_tok = prev_tok; last_tok = prev_last;
#ifdef WAIT
       /* The writer's WAIT will fail; a lost completion leaves its effect unrecorded. */
       max_issued = prev_max; lost_w[writer] = true; excuse(writer);
#endif
       unrepl = false
     }
#endif
  od
}

#ifdef LIVENESS
/* Time passes while a copy is unacked. Without this process a deadlock (every worker blocked,
 * a copy unacked) would end the run, and Spin's weak-fairness search (-f) does not report
 * such a finite run; with it, the deadlock is a fair cycle that violates `live`. (A process
 * of its own: fairness is per process, and inside Env this step could starve the expiry.) */
active proctype Ticker() {
end:
  do
  :: !ALL_ACKED -> skip
  od
}
#endif

init {
  byte i = 1;
  atomic {
    do
    :: i <= WORKERS -> run Worker(i); i++
    :: i > WORKERS -> break
    od
  }
}

#ifdef LIVENESS
/* Every copy is eventually acked, and no claim stays live forever. */
ltl live { <> [] (ALL_ACKED && rec != HELD) }
#endif
