/**
 * KafkaConsumer: a consumer-group member that hands records to a key-ordered worker pool and commits manually.
 *
 * Guarantees (design.md: Delivery, Ordering, Worker pool, Commits, Rebalance, Shutdown):
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

export const make = (
  options: ConsumerOptions
): Effect.Effect<KafkaConsumer["Service"], never, KafkaClient.KafkaClient> =>
  Effect.gen(function* () {
    const client = yield* KafkaClient.KafkaClient
    const retrySchedule = options.retrySchedule ?? capped("100 millis", "30 seconds")
    const restartSchedule = options.restartSchedule ?? capped("1 second", "30 seconds")
    let inFlight: Effect.Effect<number> = Effect.succeed(0)
    const tick = Duration.min(options.commitInterval, options.heartbeatInterval ?? Duration.seconds(3))

    const run = <E, R>(handler: Handler<E, R>) =>
      Effect.gen(function* () {
        const pool = yield* WorkerPool.make({ workers: options.workers, maxInFlight: options.maxInFlight })
        const group = { group: options.groupId }
        const inFlightGauge = Metric.withAttributes(Metrics.recordsInFlight, group)
        const commitCounter = Metric.withAttributes(Metrics.commits, group)
        const consumed = Metrics.tagged(Metrics.recordsConsumed)
        const lag = Metrics.tagged(Metrics.consumerLag)
        // Partitions whose lag this member reports: set to 0 once the partition is no longer its own (another member
        // reports it now), so that the sum over members counts no lag twice.
        const lagged = new Map<string, { readonly topic: string; readonly partition: number }>()
        /** A partition's key in `lagged` and in `active` (below). */
        const activeKey = (topic: string, partition: number) => `${partition}\u0000${topic}`
        const reportLag = (topic: string, partition: number, behind: bigint) =>
          Effect.suspend(() => {
            lagged.set(activeKey(topic, partition), { topic, partition })
            return Metric.update(
              lag({ group: options.groupId, topic, partition: String(partition) }),
              Math.max(0, Number(behind))
            )
          })
        const clearLag = (keep: ReadonlySet<string>) =>
          Effect.forEach(
            [...lagged].filter(([key]) => !keep.has(key)),
            ([key, { topic, partition }]) =>
              Effect.suspend(() => {
                lagged.delete(key)
                return Metric.update(lag({ group: options.groupId, topic, partition: String(partition) }), 0)
              }),
            { discard: true }
          )
        inFlight = Effect.sync(() => uncommitted)
        yield* Effect.addFinalizer(() =>
          Effect.sync(() => (inFlight = Effect.succeed(0))).pipe(Effect.andThen(Metric.update(inFlightGauge, 0)))
        )
        const tracker = OffsetTracker.make()
        // The commit window: records delivered to the pool and not yet committed. A record takes a place before
        // it is submitted and gives it back when a commit covers it, so at most maxInFlight records are ever
        // uncommitted — which bounds what a crash can make the group handle twice.
        let uncommitted = 0
        let waitingForWindow = 0
        // Completed when places are given back, or when a record finishes while a submitter waits (a commit can
        // then give places back).
        const windowChanged = ChangeSignal.make()
        const release = (records: number) => {
          if (records === 0) return
          uncommitted -= records
          windowChanged.notify()
        }
        /**
         * Takes up to `wanted` places, committing what finished while the window is full. Takes none (0) when the
         * member stops or must rejoin meanwhile: the batch call then returns with what it holds, or kafkajs could
         * never rejoin. The commits are tried again on every tick, for while the member is fenced they fail, and
         * only a successful commit gives places back.
         */
        const takeWindowPlaces = (
          connection: KafkaClient.ConsumerConnection,
          wanted: number,
          stopping: Deferred.Deferred<void>,
          session: KafkaClient.BatchSession
        ) =>
          Effect.gen(function* () {
            while (uncommitted >= options.maxInFlight) {
              const changed = windowChanged.ticket()
              // Finished records of any active batch free places once committed: commit them all now.
              yield* commit(connection, stopping)
              if (uncommitted < options.maxInFlight) break
              if ((yield* Deferred.isDone(stopping)) || (yield* session.isStale)) return 0
              waitingForWindow++
              yield* Effect.raceAll([changed, Deferred.await(stopping), Effect.sleep(tick)]).pipe(
                Effect.ensuring(
                  Effect.sync(() => {
                    waitingForWindow--
                  })
                )
              )
            }
            const taken = Math.min(wanted, options.maxInFlight - uncommitted)
            uncommitted += taken
            return taken
          })

        /** A record's handler, tried until it succeeds; failures and defects are logged with its coordinates. */
        const services = yield* Effect.context<R>()
        // An interruption raised inside a handler (it interrupted itself, or joined an interrupted fiber) is a
        // failure like any other: the pool's own shutdown interrupts the worker from outside, which no catch sees.
        const retryFailed = (record: KafkaClient.ConsumedRecord, first: Cause.Cause<E>) =>
          Effect.logWarning("handler failed; the record will be tried again", prettyCause(first)).pipe(
            Effect.annotateLogs(coordinates(record)),
            Effect.andThen(
              // Suspended: a handler that throws instead of returning an effect must not throw here.
              Effect.suspend(() => handler(record)).pipe(
                // Defects count as failures too: the record is tried again, the pool never crashes.
                Effect.sandbox,
                Effect.tapError((cause) =>
                  Effect.logError("handler failed again", prettyCause(cause)).pipe(
                    Effect.annotateLogs(coordinates(record))
                  )
                ),
                // Tried until it succeeds: once a finite `retrySchedule` is done, every 30 s.
                Effect.retry({ schedule: Schedule.concat(retrySchedule, Schedule.spaced("30 seconds")) }),
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
        const handleRun = (
          records: ReadonlyArray<KafkaClient.ConsumedRecord>,
          sequences: ReadonlyArray<number>,
          onFinished: (sequence: number) => void
        ): Effect.Effect<void> =>
          Effect.suspend(() => {
            let index = 0
            let current = records[0] as KafkaClient.ConsumedRecord
            const recover = (cause: Cause.Cause<E>) => retryFailed(current, cause)
            return Effect.whileLoop({
              while: () => index < records.length,
              body: () => {
                current = records[index] as KafkaClient.ConsumedRecord
                let handled: Effect.Effect<void, E, R>
                try {
                  handled = handler(current)
                } catch (defect) {
                  // A handler that throws instead of returning an effect is a defect like any other.
                  handled = Effect.die(defect)
                }
                return Effect.catchCause(handled, recover)
              },
              step: () => onFinished(sequences[index++] as number)
            })
          }).pipe(Effect.ignore, Effect.provideContext(services))

        // Partitions with a running batch call, which this member owns for as long as the call runs: commits go
        // only to them. Progress left in the tracker for a partition given up (its last commit failed) is not
        // committed later, possibly over the commits of its new owner.
        const active = new Map<
          string,
          { readonly topic: string; readonly partition: number; calls: number; highWatermark: bigint }
        >()
        // One commit at a time, each for every active partition's progress (so the commits of batch calls ending
        // together make one request); never interrupted halfway: a commit cut off between taking its offsets and
        // its answer would neither give its places back nor offer its offsets again, and kafkajs, still retrying
        // it, could apply it after a later commit of the same partition.
        const commitLock = Semaphore.makeUnsafe(1)
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

        // The keys of the assignment, made again only when it changes: commits come every tick from every batch call.
        let assignedFor: KafkaClient.Assignment | undefined
        let assignedSet = new Set<string>()
        const assignedKeys = (assignment: KafkaClient.Assignment) => {
          if (assignment !== assignedFor) {
            assignedFor = assignment
            assignedSet = new Set(assignment.partitions.map((tp) => activeKey(tp.topic, tp.partition)))
          }
          return assignedSet
        }

        /** Commits the progress of the active partitions still assigned; succeeds with false when that failed. */
        const commitNow = (connection: KafkaClient.ConsumerConnection, stopping: Deferred.Deferred<void>) =>
          Effect.gen(function* () {
            // A partition this member no longer has (kafkajs rejoined while a batch call for it still runs) is
            // left out: the group accepts a commit of the current generation for any partition.
            const assigned = assignedKeys(yield* connection.assignment)
            const owned = [...active].filter(([key]) => assigned.has(key)).map(([, entry]) => entry)
            const commits = tracker.takeCommits(owned)
            if (commits.length === 0) return true
            return yield* answerOf(connection, commits, stopping).pipe(
              Effect.tap(() => Effect.sync(() => release(commits.reduce((n, c) => n + c.records, 0)))),
              Effect.tap(() => Metric.update(commitCounter, 1)),
              // While a batch call runs, its partition's lag is what lies beyond the commit, as of the fetch: a call
              // held by a record that does not finish shows its partition falling behind.
              Effect.tap(() =>
                Effect.forEach(
                  commits,
                  (c) => {
                    const hw = active.get(activeKey(c.topic, c.partition))?.highWatermark
                    return hw === undefined ? Effect.void : reportLag(c.topic, c.partition, hw - c.offset)
                  },
                  { discard: true }
                )
              ),
              Effect.tap(() => Effect.suspend(() => Metric.update(inFlightGauge, uncommitted))),
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
                Effect.sync(() => release(tracker.rollback(commits))).pipe(
                  Effect.andThen(Effect.suspend(() => Metric.update(inFlightGauge, uncommitted))),
                  Effect.andThen(Effect.logWarning(`commit failed, will try again: ${error.message}`)),
                  Effect.as(false)
                )
              )
            )
          }).pipe(Effect.uninterruptible)
        const commit = (connection: KafkaClient.ConsumerConnection, stopping: Deferred.Deferred<void>) =>
          commitLock.withPermit(commitNow(connection, stopping))
        /** A commit unless one is running, which covers every active partition: the heartbeat never waits for it. */
        const commitIfIdle = (connection: KafkaClient.ConsumerConnection, stopping: Deferred.Deferred<void>) =>
          commitLock.withPermitsIfAvailable(1)(commitNow(connection, stopping))

        /** How many records from `index` on (at most `limit`) are due now. */
        const dueRecords = (records: ReadonlyArray<KafkaClient.ConsumedRecord>, index: number, limit: number) =>
          Effect.map(Clock.currentTimeMillis, (now) => {
            let due = 0
            while (due < limit) {
              const record = records[index + due]
              if (record === undefined || (options.dueAt?.(record) ?? now) > now) break
              due++
            }
            return due
          })
        const pauseUntilDue = (
          connection: KafkaClient.ConsumerConnection,
          partition: KafkaClient.TopicPartition,
          head: KafkaClient.ConsumedRecord | undefined,
          memberScope: Scope.Scope
        ) =>
          Effect.gen(function* () {
            const now = yield* Clock.currentTimeMillis
            const wait = Math.max(0, (head === undefined ? now : (options.dueAt?.(head) ?? now)) - now)
            yield* connection.pause([partition])
            // Resumed by a fiber of the member: if the member stops first, its successor starts unpaused.
            yield* connection.resume([partition]).pipe(Effect.delay(Duration.millis(wait)), Effect.forkIn(memberScope))
          })

        // Batch calls running now; shutdown waits for them (and their last commit) before the member leaves.
        let activeBatches = 0
        let batchesIdle = Deferred.makeUnsafe<void>()
        Deferred.doneUnsafe(batchesIdle, Effect.void)

        const trackBatch = <A, E, R2>(batchCall: Effect.Effect<A, E, R2>) =>
          Effect.acquireUseRelease(
            Effect.sync(() => {
              if (activeBatches++ === 0) batchesIdle = Deferred.makeUnsafe<void>()
            }),
            () => batchCall,
            () =>
              Effect.sync(() => {
                if (--activeBatches === 0) Deferred.doneUnsafe(batchesIdle, Effect.void)
              })
          )

        // `stopping` is set when this member incarnation stops (shutdown, or a crash before a restart): its batch
        // calls take no new records and wait at most shutdownTimeout.
        const handleBatch =
          (
            connection: KafkaClient.ConsumerConnection,
            stopping: Deferred.Deferred<void>,
            memberScope: Scope.Scope
          ): KafkaClient.BatchHandler<R> =>
          (batch, session) =>
            Effect.gen(function* () {
              const partition = { topic: batch.topic, partition: batch.partition }
              const first = batch.records[0]
              if (first === undefined) return { resumeAt: 0n }
              if (yield* Deferred.isDone(stopping)) {
                // Shutting down: take nothing. Pause a moment, or kafkajs refetches the backlog in a hot loop.
                yield* Effect.sleep(Duration.min(tick, Duration.millis(100)))
                return { resumeAt: first.offset }
              }
              // Nothing of this partition is in flight between batch calls: start it afresh (it may have moved).
              release(tracker.forget(batch.topic, batch.partition))
              const key = activeKey(batch.topic, batch.partition)
              const entry = active.get(key) ?? { ...partition, calls: 0, highWatermark: batch.highWatermark }
              entry.highWatermark = batch.highWatermark
              yield* reportLag(batch.topic, batch.partition, batch.highWatermark - first.offset)
              entry.calls++
              active.set(key, entry)
              yield* Effect.addFinalizer(() =>
                Effect.sync(() => {
                  if (--entry.calls === 0) active.delete(key)
                })
              )
              let remaining = 0
              let submitted = false
              let resumeAt: bigint | undefined
              let paused = false
              const allDone = Deferred.makeUnsafe<void>()
              // Heartbeat, and commit progress, every tick for as long as the batch call runs, submitting included:
              // in two loops, so that a slow commit never holds up the heartbeat (it could cost the member its
              // session).
              yield* session.heartbeat.pipe(
                Effect.catch((error) => Effect.logWarning(`heartbeat failed: ${error.message}`)),
                Effect.delay(tick),
                Effect.forever,
                Effect.forkScoped
              )
              yield* commitIfIdle(connection, stopping).pipe(Effect.delay(tick), Effect.forever, Effect.forkScoped)
              const records = batch.records
              // Taken once per batch call: after `forget` (the next batch call of this partition) it is detached,
              // so a record of this call that finishes late cannot mark the next call's records finished.
              const offsets = tracker.partition(batch.topic, batch.partition)
              const onFinished = (sequence: number) => {
                offsets.finished(sequence)
                remaining--
                if (submitted && remaining === 0) Deferred.doneUnsafe(allDone, Effect.void)
                if (waitingForWindow > 0) windowChanged.notify()
              }
              let index = 0
              while (index < records.length) {
                // A pending rebalance or shutdown: take no more of this batch. What is not finished is not
                // committed, so the partition's next owner (maybe this member) fetches it again.
                if ((yield* Deferred.isDone(stopping)) || (yield* session.isStale)) {
                  resumeAt = records[index]?.offset
                  break
                }
                let chunk = Math.min(records.length - index, 512)
                if (options.dueAt !== undefined) {
                  const due = yield* dueRecords(records, index, chunk)
                  if (due === 0) {
                    // The head is not due: pause the partition until it is and give the batch call back, so the
                    // wait holds up neither other partitions nor a rebalance. It is fetched again from here.
                    resumeAt = records[index]?.offset
                    paused = true
                    yield* pauseUntilDue(connection, partition, records[index], memberScope)
                    break
                  }
                  chunk = due
                }
                // Places in the window for a chunk of records at once, then the chunk to the pool: one job per
                // worker it reaches, holding that worker's records in offset order (so per-key order holds).
                const taken = yield* takeWindowPlaces(connection, chunk, stopping, session)
                if (taken === 0) {
                  resumeAt = records[index]?.offset
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
                  const worker = pool.workerOf(record.key)
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
                remaining += taken
                // The window bounds what is queued (a queued record is uncommitted), so the pool counts nothing:
                // its places, given back only as a worker's chunk ends, would be held by records long finished and
                // committed, and a submit waiting for them would hold this batch call, a rebalance and shutdown.
                for (const share of runs) {
                  yield* pool.offerTo(share.worker, handleRun(share.records, share.sequences, onFinished))
                }
                index += taken
                yield* Metric.update(consumed({ topic: batch.topic }), taken)
                yield* Metric.update(inFlightGauge, uncommitted)
              }
              submitted = true
              if (remaining === 0) Deferred.doneUnsafe(allDone, Effect.void)
              // Wait for the batch until it is done or shutdown starts; then wait at most shutdownTimeout: what did
              // not finish by then is not committed and will be redelivered.
              const stopped = yield* Effect.raceFirst(
                Deferred.await(allDone).pipe(Effect.as(false)),
                Deferred.await(stopping).pipe(Effect.as(true))
              )
              const finished =
                !stopped ||
                Option.isSome(yield* Deferred.await(allDone).pipe(Effect.timeoutOption(options.shutdownTimeout)))
              if (!finished) {
                yield* Effect.logWarning(
                  `shutdown timeout: ${remaining} records of ${batch.topic}[${batch.partition}] did not finish and will be redelivered`
                )
              }
              // The last commit of the call, tried again on every tick until it succeeds, unless the member stops or
              // must rejoin: kafkajs moves past the batch when the call returns, so progress left uncommitted would
              // wait for the partition's next records to be committed (and be handled again after a rebalance).
              while (!(yield* commit(connection, stopping))) {
                if ((yield* Deferred.isDone(stopping)) || (yield* session.isStale)) break
                yield* Effect.sleep(tick)
              }
              // Whatever is still uncommitted (the member stops or rejoins; records that did not finish) is the next
              // owner's to handle again: its places go back now, as the partition may not come back to this member.
              // Only the partition's last running call forgets it: a call that overlapped a newer one (kafkajs does not
              // run two for one partition, but nothing here relies on it) must not drop the newer call's state.
              if (entry.calls === 1) release(tracker.forget(batch.topic, batch.partition))
              yield* Metric.update(inFlightGauge, uncommitted)
              // What is left of the partition after what this call took, as of the fetch.
              const next = resumeAt ?? (records.at(-1)?.offset ?? first.offset) + 1n
              yield* reportLag(batch.topic, batch.partition, batch.highWatermark - next)
              if (resumeAt === first.offset && !paused) {
                // Nothing taken: the member waits to rejoin. Pause a moment, or kafkajs refetches in a hot loop.
                yield* Effect.sleep(Duration.min(tick, Duration.millis(100)))
              }
              return resumeAt === undefined ? undefined : { resumeAt }
            }).pipe(Effect.scoped, trackBatch)

        const rebalancesCounter = Metric.withAttributes(Metrics.rebalances, group)

        /**
         * A member's readiness: assigned (its first join is done, with partitions or without), and in touch with its
         * brokers. No answer to any fetch, heartbeat or commit for longer than the session timeout (a hung broker
         * neither refuses nor answers; a dead one is seen at once as a crash) makes it not ready, with the reason,
         * until the next answer. Checked every heartbeat interval. Succeeds with what marks it assigned.
         */
        const watchReadiness = (connection: KafkaClient.ConsumerConnection, service: string) =>
          Effect.gen(function* () {
            let assigned = false
            let silent: string | undefined
            const report = Effect.suspend(() => Observability.report(service, assigned && silent === undefined, silent))
            const bound = Duration.toMillis(options.sessionTimeout ?? Duration.seconds(30))
            const check = Effect.gen(function* () {
              const quiet = (yield* Clock.currentTimeMillis) - (yield* connection.lastContact)
              const was = silent
              silent =
                quiet > bound
                  ? `no answer from the brokers (fetch, heartbeat or commit) for ${Math.round(quiet / 1000)} s, more than the session timeout (${Math.round(bound / 1000)} s)`
                  : undefined
              if (silent !== was) yield* report
            })
            yield* Effect.forkScoped(
              Effect.repeat(check, Schedule.spaced(options.heartbeatInterval ?? Duration.seconds(3)))
            )
            yield* report
            return Effect.suspend(() => {
              assigned = true
              return report
            })
          })

        const member = Effect.gen(function* () {
          const stopping = yield* Deferred.make<void>()
          const connection = yield* client.consumer({
            groupId: options.groupId,
            topics: options.topics,
            fromBeginning: options.fromBeginning,
            fetchMinBytes: options.fetchMinBytes,
            fetchMaxBytes: options.fetchMaxBytes,
            fetchMaxWait: options.fetchMaxWait ?? Duration.millis(500),
            sessionTimeout: options.sessionTimeout,
            heartbeatInterval: options.heartbeatInterval,
            partitionsConsumedConcurrently: options.partitionsConsumedConcurrently ?? 64
          })
          // Released before the connection (finalizers run in reverse): shutdown starts, the batch calls finish
          // (within shutdownTimeout) and commit, and only then does the member leave its group — kafkajs drops
          // commits made once it has begun to stop.
          yield* Effect.addFinalizer(() =>
            Deferred.succeed(stopping, undefined).pipe(
              Effect.andThen(Effect.suspend(() => Deferred.await(batchesIdle))),
              Effect.timeoutOption(Duration.sum(options.shutdownTimeout, shutdownGrace))
            )
          )
          const service = `consumer ${options.groupId}`
          const markAssigned = yield* watchReadiness(connection, service)
          yield* Effect.addFinalizer(() => Observability.report(service, false))
          yield* Effect.addFinalizer(() => clearLag(new Set()))
          yield* connection.assignments.pipe(
            Stream.tap((assignment) =>
              assignment.generation > 0
                ? markAssigned.pipe(
                    Effect.andThen(Metric.update(rebalancesCounter, 1)),
                    Effect.andThen(
                      clearLag(new Set(assignment.partitions.map((tp) => activeKey(tp.topic, tp.partition))))
                    )
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
          yield* connection.run(handleBatch(connection, stopping, yield* Effect.scope))
          started = true
          yield* Effect.logInfo(`consuming ${options.topics.join(", ")} as ${options.groupId}`)
          return yield* connection.crashed
        }).pipe(Effect.scoped)

        // A member that never started with an error that retrying cannot fix (an unknown topic, bad credentials)
        // fails `run`; once it has run, it is restarted whatever stopped it, as kafkajs crashes on anything — but a
        // corrupt batch, which would fail every restart the same way: going past it loses records, which is for a
        // person to decide, so `run` fails and readiness says why.
        let started = false
        const restarts = (error: KafkaClient.KafkaError) =>
          error.reason._tag !== "CorruptBatch" && (started || error.retriable)
        return yield* member.pipe(
          Effect.tapError((error) =>
            restarts(error)
              ? // It recovers by itself when it can: a warning, unless the cause is one that needs a person.
                Effect.logWithLevel(error.retriable ? "Warn" : "Error")(
                  `consumer stopped: ${error.message}; restarting`
                )
              : Effect.logError(`consumer ${started ? "stopped" : "could not start"}: ${error.message}`).pipe(
                  Effect.andThen(Observability.report(`consumer ${options.groupId}`, false, error.message))
                )
          ),
          Effect.retry({ schedule: restartSchedule, while: restarts })
        )
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
  heartbeatInterval: config.heartbeatInterval
})

export const layer = (options: ConsumerOptions): Layer.Layer<KafkaConsumer, never, KafkaClient.KafkaClient> =>
  Layer.effect(KafkaConsumer, make(options))

export const layerConfig: Layer.Layer<KafkaConsumer, KafkaConfig.KafkaConfigError, KafkaClient.KafkaClient> =
  Layer.effect(
    KafkaConsumer,
    Effect.flatMap(KafkaConfig.consumer, (config) => make(optionsFrom(config)))
  )
