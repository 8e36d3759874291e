/**
 * KafkaConsumer: a consumer-group member that hands records to a key-ordered worker pool and commits manually.
 *
 * Guarantees (docs/guarantees.md, KafkaConsumer: delivery, ordering, worker pool, commits, rebalance, shutdown):
 * - At-least-once: no offset is committed past a record whose handler has not finished (`OffsetTracker`).
 * - Records with the same key are handled one at a time, in offset order; different keys run in parallel, across
 *   partitions too (`WorkerPool`, `KAFKA_CONSUMER_WORKERS` fibers). Records without a key may run in parallel.
 * - At most `maxInFlight` records are queued or running; beyond that the member stops fetching (backpressure).
 * - A partition's batch is handled inside that partition's batch call: the records go to the pool, the call
 *   heartbeats and commits every tick (the shorter of `commitInterval` and the heartbeat interval) while it waits,
 *   and commits at the end. kafkajs rejoins its group after running batch calls return, so no batch outlives its
 *   partition's ownership; where kafkajs rejoins anyway (a fetch that finds a partition's leader moved rejoins from
 *   that broker's fetcher), the batch calls that began before are stale and take no more records. Commits go only to
 *   partitions with a running batch call, one commit at a time, never cut off halfway: after a rebalance no stale
 *   batch is handled twice by this member and no commit goes to a partition it lost.
 * - A commit that fails is logged and tried again later; it never stops the consumer.
 * - A handler failure (typed error or defect) is logged with the record's coordinates and the record is tried again
 *   on `retrySchedule` until it succeeds: the partition waits, nothing is lost. The Processor turns failures into
 *   retry-topic and dead-letter records instead, so its handler never fails here.
 * - If the client gives up (a kafkajs crash), the member is restarted on `restartSchedule`.
 * - Shutdown (interrupting `run`, as SIGINT/SIGTERM do through NodeRuntime): no new records are taken, handlers in
 *   flight get up to `shutdownTimeout` to finish, what finished is committed, then the member leaves its group.
 *
 * @example
 * ```ts
 * const program = KafkaConsumer.run((record) => Effect.log(`got ${record.offset} of ${record.topic}[${record.partition}]`))
 * NodeRuntime.runMain(program.pipe(Effect.provide(KafkaConsumer.layerConfig), Effect.provide(KafkaClient.layerConfig)))
 * ```
 */
import {
  type Cause,
  Clock,
  Context,
  Deferred,
  Duration,
  Effect,
  Fiber,
  Layer,
  Metric,
  Option,
  Schedule,
  type Scope,
  Semaphore,
  Stream
} from "effect"
import { prettyCause } from "./internal/cause.ts"
import * as ChangeSignal from "./internal/changeSignal.ts"
import { coordinates } from "./internal/records.ts"
import * as KafkaClient from "./KafkaClient.ts"
import * as KafkaConfig from "./KafkaConfig.ts"
import * as Metrics from "./Metrics.ts"
import * as Observability from "./Observability.ts"
import * as OffsetTracker from "./OffsetTracker.ts"
import * as WorkerPool from "./WorkerPool.ts"

export interface ConsumerOptions {
  readonly groupId: string
  readonly topics: ReadonlyArray<string>
  readonly workers: number
  readonly maxInFlight: number
  readonly fromBeginning: boolean
  readonly fetchMinBytes?: number | undefined
  readonly fetchMaxBytes?: number | undefined
  /** how long the broker may hold a fetch to gather fetchMinBytes. Default 500 ms, as the Java client */
  readonly fetchMaxWait?: Duration.Duration | undefined
  readonly commitInterval: Duration.Duration
  readonly shutdownTimeout: Duration.Duration
  readonly sessionTimeout?: Duration.Duration | undefined
  readonly heartbeatInterval?: Duration.Duration | undefined
  /**
   * the group protocol: `classic` (the default) or KIP-848's `consumer`, where the engine has it (platformatic);
   * with `consumer` the session timeout and heartbeat interval are the broker's (group.consumer.*)
   */
  readonly groupProtocol?: KafkaConfig.GroupProtocol | undefined
  /** how many partitions' batches are fed to the pool at once. Default 64 */
  readonly partitionsConsumedConcurrently?: number | undefined
  /** how a failing record is tried again. Default: exponential from 100 ms, jittered, capped at 30 s */
  readonly retrySchedule?: Schedule.Schedule<unknown, unknown> | undefined
  /** how a crashed member is restarted. Default: exponential from 1 s, jittered, capped at 30 s */
  readonly restartSchedule?: Schedule.Schedule<unknown, KafkaClient.KafkaError> | undefined
  /**
   * When a record may be handled (epoch milliseconds; `undefined`: now). A partition whose next record is not due
   * is paused until it is, without holding up other partitions. Records of a partition must be due in offset order
   * (a retry topic with one fixed delay), so waiting for the head of a partition is enough.
   */
  readonly dueAt?: ((record: KafkaClient.ConsumedRecord) => number | undefined) | undefined
}

/** A record handler: it may fail; the Consumer tries the record again until it succeeds. */
export type Handler<E, R> = (record: KafkaClient.ConsumedRecord) => Effect.Effect<void, E, R>

export class KafkaConsumer extends Context.Service<
  KafkaConsumer,
  {
    readonly options: ConsumerOptions
    /** records delivered to the worker pool and not yet committed (0 when not running); at most maxInFlight */
    readonly inFlight: Effect.Effect<number>
    /** Consumes until interrupted (then shuts down gracefully); fails only if the member cannot start. */
    readonly run: <E, R>(handler: Handler<E, R>) => Effect.Effect<never, KafkaClient.KafkaError, R>
  }
>()("kafka-effect/KafkaConsumer") {}

const capped = (base: Duration.Input, max: Duration.Input) =>
  Schedule.exponential(base, 2).pipe(
    Schedule.jittered,
    Schedule.modifyDelay(({ duration }) => Effect.succeed(Duration.min(duration, Duration.fromInputUnsafe(max))))
  )

/** How long shutdown waits, beyond the shutdown timeout, for the batch calls' last commits. */
const shutdownGrace = Duration.seconds(5)

/**
 * One `run`: the handler, the worker pool, the commit window, the offsets of what was delivered, the partitions
 * with a running batch call, the metrics. The stages below (the window, handling records, commits, batch calls,
 * the member's lifecycle) each take it first. It outlives the member's restarts.
 */
interface Run<E, R> {
  readonly options: ConsumerOptions
  readonly client: KafkaClient.KafkaClient["Service"]
  readonly handler: Handler<E, R>
  readonly services: Context.Context<R>
  readonly retrySchedule: Schedule.Schedule<unknown, unknown>
  readonly restartSchedule: Schedule.Schedule<unknown, KafkaClient.KafkaError>
  /** how often batch calls heartbeat and commit: the shorter of the commit and heartbeat intervals */
  readonly tick: Duration.Duration
  readonly pool: WorkerPool.WorkerPool
  readonly tracker: OffsetTracker.OffsetTracker
  /**
   * The commit window: records delivered to the pool and not yet committed. A record takes a place before it is
   * submitted and gives it back when a commit covers it, so at most maxInFlight records are ever uncommitted —
   * which bounds what a crash can make the group handle twice.
   */
  uncommitted: number
  waitingForWindow: number
  /** completed when places are given back, or when a record finishes while a submitter waits */
  readonly windowChanged: ChangeSignal.ChangeSignal
  /**
   * Partitions with a running batch call, which this member owns for as long as the call runs: commits go only to
   * them. Progress left in the tracker for a partition given up (its last commit failed) is not committed later,
   * possibly over the commits of its new owner.
   */
  readonly active: Map<
    string,
    { readonly topic: string; readonly partition: number; calls: number; highWatermark: bigint }
  >
  /**
   * One commit at a time, each for every active partition's progress (so the commits of batch calls ending together
   * make one request); never interrupted halfway: a commit cut off between taking its offsets and its answer would
   * neither give its places back nor offer its offsets again, and kafkajs, still retrying it, could apply it after a
   * later commit of the same partition.
   */
  readonly commitLock: Semaphore.Semaphore
  /** the keys of the assignment, made again only when it changes: commits come every tick from every batch call */
  assignedFor: KafkaClient.Assignment | undefined
  assignedSet: Set<string>
  /** batch calls running now; shutdown waits for them (and their last commit) before the member leaves */
  activeBatches: number
  batchesIdle: Deferred.Deferred<void>
  /** the member has run once: from then on it is restarted whatever stopped it (`restarts`) */
  started: boolean
  readonly inFlightGauge: Metric.Gauge<number>
  readonly commitCounter: Metric.Counter<number>
  readonly rebalancesCounter: Metric.Counter<number>
  readonly consumed: (attributes: Readonly<Record<string, string>>) => Metric.Counter<number>
  readonly lag: (attributes: Readonly<Record<string, string>>) => Metric.Gauge<number>
  /**
   * Partitions whose lag this member reports: set to 0 once the partition is no longer its own (another member
   * reports it now), so that the sum over members counts no lag twice.
   */
  readonly lagged: Map<string, { readonly topic: string; readonly partition: number }>
}

// ---------------------------------------------------------------------------------------------------------------
// Lag
// ---------------------------------------------------------------------------------------------------------------
/** A partition's key in `lagged` and in `active` (below). */
const activeKey = (topic: string, partition: number) => `${partition}\u0000${topic}`

const reportLag = <E, R>(s: Run<E, R>, topic: string, partition: number, behind: bigint) =>
  Effect.suspend(() => {
    s.lagged.set(activeKey(topic, partition), { topic, partition })
    return Metric.update(
      s.lag({ group: s.options.groupId, topic, partition: String(partition) }),
      Math.max(0, Number(behind))
    )
  })

const clearLag = <E, R>(s: Run<E, R>, keep: ReadonlySet<string>) =>
  Effect.forEach(
    [...s.lagged].filter(([key]) => !keep.has(key)),
    ([key, { topic, partition }]) =>
      Effect.suspend(() => {
        s.lagged.delete(key)
        return Metric.update(s.lag({ group: s.options.groupId, topic, partition: String(partition) }), 0)
      }),
    { discard: true }
  )

// ---------------------------------------------------------------------------------------------------------------
// The commit window
// ---------------------------------------------------------------------------------------------------------------
const release = <E, R>(s: Run<E, R>, records: number) => {
  if (records === 0) return
  s.uncommitted -= records
  s.windowChanged.notify()
}

/**
 * Takes up to `wanted` places, committing what finished while the window is full. Takes none (0) when the
 * member stops or must rejoin meanwhile: the batch call then returns with what it holds, or kafkajs could
 * never rejoin. The commits are tried again on every tick, for while the member is fenced they fail, and
 * only a successful commit gives places back.
 */
const takeWindowPlaces = <E, R>(
  s: Run<E, R>,
  connection: KafkaClient.ConsumerConnection,
  wanted: number,
  stopping: Deferred.Deferred<void>,
  session: KafkaClient.BatchSession
) =>
  Effect.gen(function* () {
    while (s.uncommitted >= s.options.maxInFlight) {
      const changed = s.windowChanged.ticket()
      // Finished records of any active batch free places once committed: commit them all now.
      yield* commit(s, connection, stopping)
      if (s.uncommitted < s.options.maxInFlight) break
      if ((yield* Deferred.isDone(stopping)) || (yield* session.isStale)) return 0
      s.waitingForWindow++
      yield* Effect.raceAll([changed, Deferred.await(stopping), Effect.sleep(s.tick)]).pipe(
        Effect.ensuring(
          Effect.sync(() => {
            s.waitingForWindow--
          })
        )
      )
    }
    const taken = Math.min(wanted, s.options.maxInFlight - s.uncommitted)
    s.uncommitted += taken
    return taken
  })

// ---------------------------------------------------------------------------------------------------------------
// Handling records: a worker's run of records, and a failed record tried again
// ---------------------------------------------------------------------------------------------------------------
// An interruption raised inside a handler (it interrupted itself, or joined an interrupted fiber) is a
// failure like any other: the pool's own shutdown interrupts the worker from outside, which no catch sees.
const retryFailed = <E, R>(s: Run<E, R>, record: KafkaClient.ConsumedRecord, first: Cause.Cause<E>) =>
  Effect.logWarning("handler failed; the record will be tried again", prettyCause(first)).pipe(
    Effect.annotateLogs(coordinates(record)),
    Effect.andThen(
      // Suspended: a handler that throws instead of returning an effect must not throw here.
      Effect.suspend(() => s.handler(record)).pipe(
        // Defects count as failures too: the record is tried again, the pool never crashes.
        Effect.sandbox,
        Effect.tapError((cause) =>
          Effect.logError("handler failed again", prettyCause(cause)).pipe(Effect.annotateLogs(coordinates(record)))
        ),
        // Tried until it succeeds: once a finite `retrySchedule` is done, every 30 s.
        Effect.retry({ schedule: Schedule.concat(s.retrySchedule, Schedule.spaced("30 seconds")) }),
        Effect.delay(Duration.millis(100))
      )
    ),
    Effect.ignore
  )

/**
 * One worker's share of a chunk: its records in offset order, in one loop on one fiber, each marked finished
 * (`onFinished`) as soon as its handler succeeds. The fast path is the handler alone, with no allocation but
 * the handler's own; only a failure pays for logging and the retry schedule. An interrupted handler (pool
 * shutdown) stops the loop and its record is not marked finished, so it is not committed.
 */
const handleRun = <E, R>(
  s: Run<E, R>,
  records: ReadonlyArray<KafkaClient.ConsumedRecord>,
  sequences: ReadonlyArray<number>,
  onFinished: (sequence: number) => void
): Effect.Effect<void> =>
  Effect.suspend(() => {
    let index = 0
    let current = records[0] as KafkaClient.ConsumedRecord
    const recover = (cause: Cause.Cause<E>) => retryFailed(s, current, cause)
    return Effect.whileLoop({
      while: () => index < records.length,
      body: () => {
        current = records[index] as KafkaClient.ConsumedRecord
        let handled: Effect.Effect<void, E, R>
        try {
          handled = s.handler(current)
        } catch (defect) {
          // A handler that throws instead of returning an effect is a defect like any other.
          handled = Effect.die(defect)
        }
        return Effect.catchCause(handled, recover)
      },
      step: () => onFinished(sequences[index++] as number)
    })
  }).pipe(Effect.ignore, Effect.provideContext(s.services))

// ---------------------------------------------------------------------------------------------------------------
// Commits
// ---------------------------------------------------------------------------------------------------------------
/**
 * The answer to a commit; once the member stops, waited for `shutdownGrace` at most. kafkajs tries a failed
 * commit 5 times, each up to its request timeout: a coordinator that does not answer would hold the batch
 * calls, and with them the member's leaving, for minutes. A commit left unanswered may still be applied;
 * the member makes no later one that it could overtake.
 */
const answerOf = (
  connection: KafkaClient.ConsumerConnection,
  commits: ReadonlyArray<KafkaClient.TopicPartitionOffset>,
  stopping: Deferred.Deferred<void>
) =>
  Effect.gen(function* () {
    const answer = Deferred.makeUnsafe<void, KafkaClient.KafkaError>()
    yield* Effect.forkDetach(
      Effect.exit(connection.commit(commits)).pipe(Effect.flatMap((exit) => Deferred.done(answer, exit)))
    )
    const deadline = yield* Effect.forkDetach(
      Deferred.await(stopping).pipe(
        Effect.andThen(Effect.sleep(shutdownGrace)),
        Effect.andThen(
          Effect.suspend(() =>
            Deferred.fail(
              answer,
              new KafkaClient.KafkaError({
                operation: "commit",
                reason: new KafkaClient.RequestTimedOut({
                  detail: `no answer ${Duration.format(shutdownGrace)} into shutdown; leaving without it`
                })
              })
            )
          )
        )
      )
    )
    return yield* Deferred.await(answer).pipe(Effect.ensuring(Fiber.interrupt(deadline)))
  })

const assignedKeys = <E, R>(s: Run<E, R>, assignment: KafkaClient.Assignment) => {
  if (assignment !== s.assignedFor) {
    s.assignedFor = assignment
    s.assignedSet = new Set(assignment.partitions.map((tp) => activeKey(tp.topic, tp.partition)))
  }
  return s.assignedSet
}

/** Commits the progress of the active partitions still assigned; succeeds with false when that failed. */
const commitNow = <E, R>(s: Run<E, R>, connection: KafkaClient.ConsumerConnection, stopping: Deferred.Deferred<void>) =>
  Effect.gen(function* () {
    // A partition this member no longer has (kafkajs rejoined while a batch call for it still runs) is
    // left out: the group accepts a commit of the current generation for any partition.
    const assigned = assignedKeys(s, yield* connection.assignment)
    const owned = [...s.active].filter(([key]) => assigned.has(key)).map(([, entry]) => entry)
    const commits = s.tracker.takeCommits(owned)
    if (commits.length === 0) return true
    return yield* answerOf(connection, commits, stopping).pipe(
      Effect.tap(() =>
        Effect.sync(() =>
          release(
            s,
            commits.reduce((n, c) => n + c.records, 0)
          )
        )
      ),
      Effect.tap(() => Metric.update(s.commitCounter, 1)),
      // While a batch call runs, its partition's lag is what lies beyond the commit, as of the fetch: a call
      // held by a record that does not finish shows its partition falling behind.
      Effect.tap(() =>
        Effect.forEach(
          commits,
          (c) => {
            const hw = s.active.get(activeKey(c.topic, c.partition))?.highWatermark
            return hw === undefined ? Effect.void : reportLag(s, c.topic, c.partition, hw - c.offset)
          },
          { discard: true }
        )
      ),
      Effect.tap(() => Effect.suspend(() => Metric.update(s.inFlightGauge, s.uncommitted))),
      Effect.tap(() =>
        Effect.logDebug("committed").pipe(
          Effect.annotateLogs({
            commits: commits.map((c) => `${c.topic}[${c.partition}]@${c.offset}`).join(" ")
          })
        )
      ),
      Effect.as(true),
      Effect.catch((error) =>
        // Offered again by the next takeCommits; the places of a partition forgotten meanwhile go back now.
        Effect.sync(() => release(s, s.tracker.rollback(commits))).pipe(
          Effect.andThen(Effect.suspend(() => Metric.update(s.inFlightGauge, s.uncommitted))),
          Effect.andThen(Effect.logWarning(`commit failed, will try again: ${error.message}`)),
          Effect.as(false)
        )
      )
    )
  }).pipe(Effect.uninterruptible)

const commit = <E, R>(s: Run<E, R>, connection: KafkaClient.ConsumerConnection, stopping: Deferred.Deferred<void>) =>
  s.commitLock.withPermit(commitNow(s, connection, stopping))

/** A commit unless one is running, which covers every active partition: the heartbeat never waits for it. */
const commitIfIdle = <E, R>(
  s: Run<E, R>,
  connection: KafkaClient.ConsumerConnection,
  stopping: Deferred.Deferred<void>
) => s.commitLock.withPermitsIfAvailable(1)(commitNow(s, connection, stopping))

// ---------------------------------------------------------------------------------------------------------------
// Batch calls: taking a batch, due times, dispatch to the pool, its end
// ---------------------------------------------------------------------------------------------------------------
/** How many records from `index` on (at most `limit`) are due now. */
const dueRecords = <E, R>(
  s: Run<E, R>,
  records: ReadonlyArray<KafkaClient.ConsumedRecord>,
  index: number,
  limit: number
) =>
  Effect.map(Clock.currentTimeMillis, (now) => {
    let due = 0
    while (due < limit) {
      const record = records[index + due]
      if (record === undefined || (s.options.dueAt?.(record) ?? now) > now) break
      due++
    }
    return due
  })

const pauseUntilDue = <E, R>(
  s: Run<E, R>,
  connection: KafkaClient.ConsumerConnection,
  partition: KafkaClient.TopicPartition,
  head: KafkaClient.ConsumedRecord | undefined,
  memberScope: Scope.Scope
) =>
  Effect.gen(function* () {
    const now = yield* Clock.currentTimeMillis
    const wait = Math.max(0, (head === undefined ? now : (s.options.dueAt?.(head) ?? now)) - now)
    yield* connection.pause([partition])
    // Resumed by a fiber of the member: if the member stops first, its successor starts unpaused.
    yield* connection.resume([partition]).pipe(Effect.delay(Duration.millis(wait)), Effect.forkIn(memberScope))
  })

const trackBatch = <E, R, A, E2, R2>(s: Run<E, R>, batchCall: Effect.Effect<A, E2, R2>) =>
  Effect.acquireUseRelease(
    Effect.sync(() => {
      if (s.activeBatches++ === 0) s.batchesIdle = Deferred.makeUnsafe<void>()
    }),
    () => batchCall,
    () =>
      Effect.sync(() => {
        if (--s.activeBatches === 0) Deferred.doneUnsafe(s.batchesIdle, Effect.void)
      })
  )

/** One batch call: its partition, the records it delivered and how many are not finished yet. */
interface BatchCall {
  readonly batch: KafkaClient.ConsumerBatch
  readonly session: KafkaClient.BatchSession
  readonly connection: KafkaClient.ConsumerConnection
  /** set when this member incarnation stops (shutdown, or a crash before a restart) */
  readonly stopping: Deferred.Deferred<void>
  readonly entry: { readonly topic: string; readonly partition: number; calls: number; highWatermark: bigint }
  /**
   * Taken once per batch call: after `forget` (the next batch call of this partition) it is detached, so a record
   * of this call that finishes late cannot mark the next call's records finished.
   */
  readonly offsets: ReturnType<OffsetTracker.OffsetTracker["partition"]>
  /** records delivered and not finished */
  remaining: number
  /** every record the call takes has been delivered */
  submitted: boolean
  /** completed once submitted and none remains */
  readonly allDone: Deferred.Deferred<void>
  /** where the partition resumes when the call did not take the whole batch */
  resumeAt: bigint | undefined
  /** the partition was paused until its head is due */
  paused: boolean
}

/**
 * A batch call begins: its partition is active (commits go to it) for as long as it runs, starts afresh in the
 * tracker (it may have moved), and gets a heartbeat and a commit every tick while the call runs, submitting
 * included — in two loops, so that a slow commit never holds up the heartbeat (it could cost the member its session).
 */
const beginBatchCall = <E, R>(
  s: Run<E, R>,
  batch: KafkaClient.ConsumerBatch,
  session: KafkaClient.BatchSession,
  connection: KafkaClient.ConsumerConnection,
  stopping: Deferred.Deferred<void>
) =>
  Effect.gen(function* () {
    const first = batch.records[0] as KafkaClient.ConsumedRecord
    release(s, s.tracker.forget(batch.topic, batch.partition))
    const key = activeKey(batch.topic, batch.partition)
    const entry = s.active.get(key) ?? {
      topic: batch.topic,
      partition: batch.partition,
      calls: 0,
      highWatermark: batch.highWatermark
    }
    entry.highWatermark = batch.highWatermark
    yield* reportLag(s, batch.topic, batch.partition, batch.highWatermark - first.offset)
    entry.calls++
    s.active.set(key, entry)
    yield* Effect.addFinalizer(() =>
      Effect.sync(() => {
        if (--entry.calls === 0) s.active.delete(key)
      })
    )
    yield* session.heartbeat.pipe(
      Effect.catch((error) => Effect.logWarning(`heartbeat failed: ${error.message}`)),
      Effect.delay(s.tick),
      Effect.forever,
      Effect.forkScoped
    )
    yield* commitIfIdle(s, connection, stopping).pipe(Effect.delay(s.tick), Effect.forever, Effect.forkScoped)
    const call: BatchCall = {
      batch,
      session,
      connection,
      stopping,
      entry,
      offsets: s.tracker.partition(batch.topic, batch.partition),
      remaining: 0,
      submitted: false,
      allDone: Deferred.makeUnsafe<void>(),
      resumeAt: undefined,
      paused: false
    }
    return call
  })

/**
 * Delivers the call's records to the pool, a chunk at a time: places in the window for the chunk, then one job per
 * worker it reaches, holding that worker's records in offset order (so per-key order holds). Stops at a pending
 * rebalance or shutdown (what is not finished is not committed, so the partition's next owner, maybe this member,
 * fetches it again), and at a head that is not due yet (the partition is paused until it is).
 */
const dispatchBatch = <E, R>(s: Run<E, R>, call: BatchCall, memberScope: Scope.Scope) =>
  Effect.gen(function* () {
    const { batch, session, connection, stopping, offsets } = call
    const records = batch.records
    const onFinished = (sequence: number) => {
      offsets.finished(sequence)
      call.remaining--
      if (call.submitted && call.remaining === 0) Deferred.doneUnsafe(call.allDone, Effect.void)
      if (s.waitingForWindow > 0) s.windowChanged.notify()
    }
    let index = 0
    while (index < records.length) {
      if ((yield* Deferred.isDone(stopping)) || (yield* session.isStale)) {
        call.resumeAt = records[index]?.offset
        break
      }
      let chunk = Math.min(records.length - index, 512)
      if (s.options.dueAt !== undefined) {
        const due = yield* dueRecords(s, records, index, chunk)
        if (due === 0) {
          // The head is not due: pause the partition until it is and give the batch call back, so the wait holds
          // up neither other partitions nor a rebalance. It is fetched again from here.
          call.resumeAt = records[index]?.offset
          call.paused = true
          yield* pauseUntilDue(
            s,
            connection,
            { topic: batch.topic, partition: batch.partition },
            records[index],
            memberScope
          )
          break
        }
        chunk = due
      }
      const taken = yield* takeWindowPlaces(s, connection, chunk, stopping, session)
      if (taken === 0) {
        call.resumeAt = records[index]?.offset
        break
      }
      const runs: Array<{
        readonly worker: number
        readonly records: Array<KafkaClient.ConsumedRecord>
        readonly sequences: Array<number>
      }> = []
      const runOf: Array<number | undefined> = []
      for (let i = index; i < index + taken; i++) {
        const record = records[i] as KafkaClient.ConsumedRecord
        const sequence = offsets.delivered(record.offset)
        const worker = s.pool.workerOf(record.key)
        let run = runOf[worker]
        if (run === undefined) {
          run = runs.length
          runOf[worker] = run
          runs.push({ worker, records: [], sequences: [] })
        }
        const share = runs[run] as (typeof runs)[number]
        share.records.push(record)
        share.sequences.push(sequence)
      }
      call.remaining += taken
      // The window bounds what is queued (a queued record is uncommitted), so the pool counts nothing: its places,
      // given back only as a worker's chunk ends, would be held by records long finished and committed, and a
      // submit waiting for them would hold this batch call, a rebalance and shutdown.
      for (const share of runs) {
        yield* s.pool.offerTo(share.worker, handleRun(s, share.records, share.sequences, onFinished))
      }
      index += taken
      yield* Metric.update(s.consumed({ topic: batch.topic }), taken)
      yield* Metric.update(s.inFlightGauge, s.uncommitted)
    }
    call.submitted = true
    if (call.remaining === 0) Deferred.doneUnsafe(call.allDone, Effect.void)
  })

/**
 * A batch call ends: it waits for its records until they are done or shutdown starts, then at most the shutdown
 * timeout (what did not finish is not committed and will be redelivered); commits, tried again on every tick
 * unless the member stops or must rejoin (kafkajs moves past the batch when the call returns, so progress left
 * uncommitted would wait for the partition's next records); and gives back the places of what is still
 * uncommitted, the next owner's to handle again.
 */
const endBatchCall = <E, R>(s: Run<E, R>, call: BatchCall) =>
  Effect.gen(function* () {
    const { batch, session, connection, stopping } = call
    const stopped = yield* Effect.raceFirst(
      Deferred.await(call.allDone).pipe(Effect.as(false)),
      Deferred.await(stopping).pipe(Effect.as(true))
    )
    const finished =
      !stopped ||
      Option.isSome(yield* Deferred.await(call.allDone).pipe(Effect.timeoutOption(s.options.shutdownTimeout)))
    if (!finished) {
      yield* Effect.logWarning(
        `shutdown timeout: ${call.remaining} records of ${batch.topic}[${batch.partition}] did not finish and will be redelivered`
      )
    }
    while (!(yield* commit(s, connection, stopping))) {
      if ((yield* Deferred.isDone(stopping)) || (yield* session.isStale)) break
      yield* Effect.sleep(s.tick)
    }
    // Only the partition's last running call forgets it: a call that overlapped a newer one (kafkajs does not run
    // two for one partition, but nothing here relies on it) must not drop the newer call's state.
    if (call.entry.calls === 1) release(s, s.tracker.forget(batch.topic, batch.partition))
    yield* Metric.update(s.inFlightGauge, s.uncommitted)
    // What is left of the partition after what this call took, as of the fetch.
    const records = batch.records
    const first = records[0] as KafkaClient.ConsumedRecord
    const next = call.resumeAt ?? (records.at(-1)?.offset ?? first.offset) + 1n
    yield* reportLag(s, batch.topic, batch.partition, batch.highWatermark - next)
    if (call.resumeAt === first.offset && !call.paused) {
      // Nothing taken: the member waits to rejoin. Pause a moment, or kafkajs refetches in a hot loop.
      yield* Effect.sleep(Duration.min(s.tick, Duration.millis(100)))
    }
  })

/**
 * The batch handler of a member incarnation: each batch call begins, dispatches its records to the pool, and ends
 * (`stopping`, set when the incarnation stops, makes its calls take no new records and wait at most the shutdown
 * timeout).
 */
const handleBatch =
  <E, R>(
    s: Run<E, R>,
    connection: KafkaClient.ConsumerConnection,
    stopping: Deferred.Deferred<void>,
    memberScope: Scope.Scope
  ): KafkaClient.BatchHandler<R> =>
  (batch, session) =>
    Effect.gen(function* () {
      const first = batch.records[0]
      if (first === undefined) return { resumeAt: 0n }
      if (yield* Deferred.isDone(stopping)) {
        // Shutting down: take nothing. Pause a moment, or kafkajs refetches the backlog in a hot loop.
        yield* Effect.sleep(Duration.min(s.tick, Duration.millis(100)))
        return { resumeAt: first.offset }
      }
      const call = yield* beginBatchCall(s, batch, session, connection, stopping)
      yield* dispatchBatch(s, call, memberScope)
      yield* endBatchCall(s, call)
      return call.resumeAt === undefined ? undefined : { resumeAt: call.resumeAt }
    }).pipe(Effect.scoped, (batchCall) => trackBatch(s, batchCall))

// ---------------------------------------------------------------------------------------------------------------
// The member's lifecycle: readiness, joining, restarts, shutdown
// ---------------------------------------------------------------------------------------------------------------
/**
 * A member's readiness: assigned (its first join is done, with partitions or without), and in touch with its
 * brokers. No answer to any fetch, heartbeat or commit for longer than the session timeout (a hung broker
 * neither refuses nor answers; a dead one is seen at once as a crash) makes it not ready, with the reason,
 * until the next answer. Checked every heartbeat interval. Succeeds with what marks it assigned.
 */
const watchReadiness = <E, R>(s: Run<E, R>, connection: KafkaClient.ConsumerConnection, service: string) =>
  Effect.gen(function* () {
    let assigned = false
    let silent: string | undefined
    const report = Effect.suspend(() => Observability.report(service, assigned && silent === undefined, silent))
    const bound = Duration.toMillis(s.options.sessionTimeout ?? Duration.seconds(30))
    const check = Effect.gen(function* () {
      const quiet = (yield* Clock.currentTimeMillis) - (yield* connection.lastContact)
      const was = silent
      silent =
        quiet > bound
          ? `no answer from the brokers (fetch, heartbeat or commit) for ${Math.round(quiet / 1000)} s, more than the session timeout (${Math.round(bound / 1000)} s)`
          : undefined
      if (silent !== was) yield* report
    })
    yield* Effect.forkScoped(Effect.repeat(check, Schedule.spaced(s.options.heartbeatInterval ?? Duration.seconds(3))))
    yield* report
    return Effect.suspend(() => {
      assigned = true
      return report
    })
  })

const member = <E, R>(s: Run<E, R>) =>
  Effect.gen(function* () {
    const stopping = yield* Deferred.make<void>()
    const connection = yield* s.client.consumer({
      groupId: s.options.groupId,
      topics: s.options.topics,
      fromBeginning: s.options.fromBeginning,
      fetchMinBytes: s.options.fetchMinBytes,
      fetchMaxBytes: s.options.fetchMaxBytes,
      fetchMaxWait: s.options.fetchMaxWait ?? Duration.millis(500),
      sessionTimeout: s.options.sessionTimeout,
      heartbeatInterval: s.options.heartbeatInterval,
      groupProtocol: s.options.groupProtocol,
      partitionsConsumedConcurrently: s.options.partitionsConsumedConcurrently ?? 64
    })
    // Released before the connection (finalizers run in reverse): shutdown starts, the batch calls finish
    // (within shutdownTimeout) and commit, and only then does the member leave its group — kafkajs drops
    // commits made once it has begun to stop.
    yield* Effect.addFinalizer(() =>
      Deferred.succeed(stopping, undefined).pipe(
        Effect.andThen(Effect.suspend(() => Deferred.await(s.batchesIdle))),
        Effect.timeoutOption(Duration.sum(s.options.shutdownTimeout, shutdownGrace))
      )
    )
    const service = `consumer ${s.options.groupId}`
    const markAssigned = yield* watchReadiness(s, connection, service)
    yield* Effect.addFinalizer(() => Observability.report(service, false))
    yield* Effect.addFinalizer(() => clearLag(s, new Set()))
    yield* connection.assignments.pipe(
      Stream.tap((assignment) =>
        assignment.generation > 0
          ? markAssigned.pipe(
              Effect.andThen(Metric.update(s.rebalancesCounter, 1)),
              Effect.andThen(clearLag(s, new Set(assignment.partitions.map((tp) => activeKey(tp.topic, tp.partition)))))
            )
          : Effect.void
      ),
      // Generation 0 is the empty assignment before the first join: nothing to say.
      Stream.filter((assignment) => assignment.generation > 0),
      Stream.runForEach((assignment) =>
        Effect.logInfo("assigned").pipe(
          Effect.annotateLogs({
            generation: assignment.generation,
            partitions: assignment.partitions.map((tp) => `${tp.topic}[${tp.partition}]`).join(" ")
          })
        )
      ),
      Effect.forkScoped
    )
    yield* connection.run(handleBatch(s, connection, stopping, yield* Effect.scope))
    s.started = true
    yield* Effect.logInfo(`consuming ${s.options.topics.join(", ")} as ${s.options.groupId}`)
    return yield* connection.crashed
  }).pipe(Effect.scoped)

const restarts = <E, R>(s: Run<E, R>, error: KafkaClient.KafkaError) =>
  error.reason._tag !== "CorruptBatch" && error.reason._tag !== "CodecUnavailable" && (s.started || error.retriable)

/**
 * The member until `run` is interrupted: restarted on `restartSchedule` after a crash, as kafkajs crashes on
 * anything — but not before it has started once when the cause is one retrying cannot fix (an unknown topic, bad
 * credentials), nor after a corrupt batch, which would fail every restart the same way: going past it loses
 * records, which is for a person to decide, so `run` fails and readiness says why.
 */
const runMember = <E, R>(s: Run<E, R>) =>
  member(s).pipe(
    Effect.tapError((error) =>
      restarts(s, error)
        ? // It recovers by itself when it can: a warning, unless the cause is one that needs a person.
          Effect.logWithLevel(error.retriable ? "Warn" : "Error")(`consumer stopped: ${error.message}; restarting`)
        : Effect.logError(`consumer ${s.started ? "stopped" : "could not start"}: ${error.message}`).pipe(
            Effect.andThen(Observability.report(`consumer ${s.options.groupId}`, false, error.message))
          )
    ),
    Effect.retry({ schedule: s.restartSchedule, while: (error) => restarts(s, error) })
  )

/** A KafkaConsumer with `options`; `run` joins the group. */
export const make = (
  options: ConsumerOptions
): Effect.Effect<KafkaConsumer["Service"], never, KafkaClient.KafkaClient> =>
  Effect.gen(function* () {
    const client = yield* KafkaClient.KafkaClient
    let inFlight: Effect.Effect<number> = Effect.succeed(0)
    const run = <E, R>(handler: Handler<E, R>) =>
      Effect.gen(function* () {
        const group = { group: options.groupId }
        const batchesIdle = Deferred.makeUnsafe<void>()
        Deferred.doneUnsafe(batchesIdle, Effect.void)
        const s: Run<E, R> = {
          options,
          client,
          handler,
          services: yield* Effect.context<R>(),
          retrySchedule: options.retrySchedule ?? capped("100 millis", "30 seconds"),
          restartSchedule: options.restartSchedule ?? capped("1 second", "30 seconds"),
          tick: Duration.min(options.commitInterval, options.heartbeatInterval ?? Duration.seconds(3)),
          pool: yield* WorkerPool.make({ workers: options.workers, maxInFlight: options.maxInFlight }),
          tracker: OffsetTracker.make(),
          uncommitted: 0,
          waitingForWindow: 0,
          windowChanged: ChangeSignal.make(),
          active: new Map(),
          commitLock: Semaphore.makeUnsafe(1),
          assignedFor: undefined,
          assignedSet: new Set(),
          activeBatches: 0,
          batchesIdle,
          started: false,
          inFlightGauge: Metric.withAttributes(Metrics.recordsInFlight, group),
          commitCounter: Metric.withAttributes(Metrics.commits, group),
          rebalancesCounter: Metric.withAttributes(Metrics.rebalances, group),
          consumed: Metrics.tagged(Metrics.recordsConsumed),
          lag: Metrics.tagged(Metrics.consumerLag),
          lagged: new Map()
        }
        inFlight = Effect.sync(() => s.uncommitted)
        yield* Effect.addFinalizer(() =>
          Effect.sync(() => (inFlight = Effect.succeed(0))).pipe(Effect.andThen(Metric.update(s.inFlightGauge, 0)))
        )
        return yield* runMember(s)
      }).pipe(Effect.scoped) as Effect.Effect<never, KafkaClient.KafkaError, R>

    return KafkaConsumer.of({ options, run, inFlight: Effect.suspend(() => inFlight) })
  })

/** Consumes with the KafkaConsumer in context until interrupted. */
export const run = <E, R>(handler: Handler<E, R>): Effect.Effect<never, KafkaClient.KafkaError, R | KafkaConsumer> =>
  Effect.gen(function* () {
    const consumer = yield* KafkaConsumer
    return yield* consumer.run(handler)
  })

/** Options from the environment's consumer settings (`KafkaConfig.consumer`). */
export const optionsFrom = (config: KafkaConfig.ConsumerConfig): ConsumerOptions => ({
  groupId: config.groupId,
  topics: [config.topic],
  workers: config.workers,
  maxInFlight: config.maxInFlight,
  fromBeginning: config.fromBeginning,
  fetchMinBytes: config.fetchMinBytes,
  fetchMaxBytes: config.fetchMaxBytes,
  fetchMaxWait: config.fetchMaxWait,
  commitInterval: config.commitInterval,
  shutdownTimeout: config.shutdownTimeout,
  sessionTimeout: config.sessionTimeout,
  heartbeatInterval: config.heartbeatInterval,
  groupProtocol: config.groupProtocol
})

/**
 * The KafkaConsumer with explicit options.
 *
 * @example
 * ```ts
 * const Live = KafkaConsumer.layer({ groupId: "billing", topics: ["orders"], workers: 8, maxInFlight: 1000,
 *   fromBeginning: true, commitInterval: Duration.seconds(5), shutdownTimeout: Duration.seconds(30) })
 * ```
 */
export const layer = (options: ConsumerOptions): Layer.Layer<KafkaConsumer, never, KafkaClient.KafkaClient> =>
  Layer.effect(KafkaConsumer, make(options))

/** The KafkaConsumer configured from the environment (`KafkaConfig.consumer`: KAFKA_CONSUMER_*). */
export const layerConfig: Layer.Layer<KafkaConsumer, KafkaConfig.KafkaConfigError, KafkaClient.KafkaClient> =
  Layer.effect(
    KafkaConsumer,
    Effect.flatMap(KafkaConfig.consumer, (config) => make(optionsFrom(config)))
  )
