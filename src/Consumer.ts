/**
 * Consumer: a consumer-group member that hands records to a key-ordered worker pool and commits manually.
 *
 * Guarantees (design.md: Delivery, Ordering, Worker pool, Commits, Rebalance, Shutdown):
 * - At-least-once: no offset is committed past a record whose handler has not finished (`OffsetTracker`).
 * - Records with the same key are handled one at a time, in offset order; different keys run in parallel, across
 *   partitions too (`WorkerPool`, `KAFKA_CONSUMER_WORKERS` fibers). Records without a key may run in parallel.
 * - At most `maxInFlight` records are queued or running; beyond that the member stops fetching (backpressure).
 * - A partition's batch is handled inside that partition's batch call: the records go to the pool, the call
 *   heartbeats and commits on `commitInterval` while it waits, and commits at the end. kafkajs rejoins its group
 *   only after running batch calls return, so no batch outlives its partition's ownership: after a rebalance no
 *   stale batch is handled twice by this member and no commit goes to a partition it lost.
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
 * const program = Consumer.run((record) => Effect.log(`got ${record.offset} of ${record.topic}[${record.partition}]`))
 * NodeRuntime.runMain(program.pipe(Effect.provide(Consumer.layerConfig), Effect.provide(KafkaClient.layerConfig)))
 * ```
 */
import { Cause, Context, Deferred, Duration, Effect, Layer, Option, Schedule } from "effect"
import * as KafkaConfig from "./Config.ts"
import * as KafkaClient from "./KafkaClient.ts"
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
}

/** A record handler: it may fail; the Consumer tries the record again until it succeeds. */
export type Handler<E, R> = (record: KafkaClient.ConsumedRecord) => Effect.Effect<void, E, R>

export class Consumer extends Context.Service<
  Consumer,
  {
    readonly options: ConsumerOptions
    /** records queued in or running on the worker pool now (0 when not running) */
    readonly inFlight: Effect.Effect<number>
    /** Consumes until interrupted (then shuts down gracefully); fails only if the member cannot start. */
    readonly run: <E, R>(handler: Handler<E, R>) => Effect.Effect<never, KafkaClient.KafkaError, R>
  }
>()("kafka-effect/Consumer") {}

const capped = (base: Duration.Input, max: Duration.Input) =>
  Schedule.exponential(base, 2).pipe(
    Schedule.jittered,
    Schedule.modifyDelay(({ duration }) => Effect.succeed(Duration.min(duration, Duration.fromInputUnsafe(max))))
  )

const coordinates = (record: KafkaClient.ConsumedRecord) => ({
  topic: record.topic,
  partition: record.partition,
  offset: record.offset.toString(),
  key: record.key === null ? null : new TextDecoder().decode(record.key)
})

export const make = (options: ConsumerOptions): Effect.Effect<Consumer["Service"], never, KafkaClient.KafkaClient> =>
  Effect.gen(function* () {
    const client = yield* KafkaClient.KafkaClient
    const retrySchedule = options.retrySchedule ?? capped("100 millis", "30 seconds")
    const restartSchedule = options.restartSchedule ?? capped("1 second", "30 seconds")
    let inFlight: Effect.Effect<number> = Effect.succeed(0)
    const tick = Duration.min(options.commitInterval, options.heartbeatInterval ?? Duration.seconds(3))

    const run = <E, R>(handler: Handler<E, R>) =>
      Effect.gen(function* () {
        const pool = yield* WorkerPool.make({ workers: options.workers, maxInFlight: options.maxInFlight })
        inFlight = pool.inFlight
        yield* Effect.addFinalizer(() => Effect.sync(() => (inFlight = Effect.succeed(0))))
        const tracker = OffsetTracker.make()
        // Set when shutdown starts: batch calls take no new records and wait at most shutdownTimeout.
        const stopping = yield* Deferred.make<void>()

        /** A record's handler, tried until it succeeds; failures and defects are logged with its coordinates. */
        const services = yield* Effect.context<R>()
        const handle = (record: KafkaClient.ConsumedRecord) =>
          handler(record).pipe(
            // Defects count as failures too: the record is tried again, the pool never crashes.
            Effect.sandbox,
            Effect.tapError((cause) =>
              Cause.hasInterruptsOnly(cause)
                ? Effect.void
                : Effect.logError("handler failed; the record will be tried again", Cause.pretty(cause)).pipe(
                    Effect.annotateLogs(coordinates(record))
                  )
            ),
            Effect.retry({ schedule: retrySchedule, while: (cause) => !Cause.hasInterruptsOnly(cause) }),
            Effect.ignore,
            Effect.provideContext(services)
          )

        const commit = (connection: KafkaClient.ConsumerConnection, partition: KafkaClient.TopicPartition) =>
          Effect.suspend(() => {
            const commits = tracker.takeCommits([partition])
            if (commits.length === 0) return Effect.void
            return connection
              .commit(commits)
              .pipe(
                Effect.catch((error) =>
                  Effect.sync(() => tracker.rollback(commits)).pipe(
                    Effect.andThen(Effect.logWarning(`commit failed, will try again: ${error.message}`))
                  )
                )
              )
          })

        const handleBatch =
          (connection: KafkaClient.ConsumerConnection): KafkaClient.BatchHandler<R> =>
          (batch, session) =>
            Effect.gen(function* () {
              if (yield* Deferred.isDone(stopping)) return
              const partition = { topic: batch.topic, partition: batch.partition }
              // Nothing of this partition is in flight between batch calls: start it afresh (it may have moved).
              tracker.forget(batch.topic, batch.partition)
              let remaining = 0
              let submitted = false
              const allDone = Deferred.makeUnsafe<void>()
              for (const record of batch.records) {
                if (yield* Deferred.isDone(stopping)) break
                tracker.delivered(record.topic, record.partition, record.offset)
                remaining++
                yield* pool.submit(
                  record.key,
                  Effect.ensuring(
                    handle(record),
                    Effect.sync(() => {
                      tracker.finished(record.topic, record.partition, record.offset)
                      remaining--
                      if (submitted && remaining === 0) Deferred.doneUnsafe(allDone, Effect.void)
                    })
                  )
                )
              }
              submitted = true
              if (remaining === 0) Deferred.doneUnsafe(allDone, Effect.void)
              // Wait for the batch, heartbeating and committing progress meanwhile, until it is done or shutdown
              // starts. Then wait at most shutdownTimeout: what did not finish by then is not committed and will
              // be redelivered.
              const waited = yield* Effect.raceFirst(
                Deferred.await(allDone).pipe(Effect.as("done" as const)),
                Deferred.await(stopping).pipe(Effect.as("stopping" as const))
              ).pipe(
                Effect.timeoutOption(tick),
                Effect.tap((outcome) =>
                  Option.isNone(outcome)
                    ? session.heartbeat.pipe(
                        Effect.catch((error) => Effect.logWarning(`heartbeat failed: ${error.message}`)),
                        Effect.andThen(commit(connection, partition))
                      )
                    : Effect.void
                ),
                Effect.repeat({ until: Option.isSome })
              )
              const finished =
                Option.getOrThrow(waited) === "done" ||
                Option.isSome(yield* Deferred.await(allDone).pipe(Effect.timeoutOption(options.shutdownTimeout)))
              if (!finished) {
                yield* Effect.logWarning(
                  `shutdown timeout: ${remaining} records of ${batch.topic}[${batch.partition}] did not finish and will be redelivered`
                )
              }
              yield* commit(connection, partition)
            })

        const member = Effect.gen(function* () {
          const connection = yield* client.consumer({
            groupId: options.groupId,
            topics: options.topics,
            fromBeginning: options.fromBeginning,
            fetchMinBytes: options.fetchMinBytes,
            fetchMaxBytes: options.fetchMaxBytes,
            sessionTimeout: options.sessionTimeout,
            heartbeatInterval: options.heartbeatInterval,
            partitionsConsumedConcurrently: options.partitionsConsumedConcurrently ?? 64
          })
          // Released before the connection (finalizers run in reverse): shutdown starts, then the member leaves
          // its group once its batch calls returned.
          yield* Effect.addFinalizer(() => Deferred.succeed(stopping, undefined))
          yield* connection.run(handleBatch(connection))
          yield* Effect.logInfo(`consuming ${options.topics.join(", ")} as ${options.groupId}`)
          return yield* connection.crashed
        }).pipe(Effect.scoped)

        return yield* member.pipe(
          Effect.tapError((error) => Effect.logError(`consumer stopped: ${error.message}; restarting`)),
          Effect.retry(restartSchedule)
        )
      }).pipe(Effect.scoped) as Effect.Effect<never, KafkaClient.KafkaError, R>

    return Consumer.of({ options, run, inFlight: Effect.suspend(() => inFlight) })
  })

/** Consumes with the Consumer in context until interrupted. */
export const run = <E, R>(handler: Handler<E, R>): Effect.Effect<never, KafkaClient.KafkaError, R | Consumer> =>
  Effect.gen(function* () {
    const consumer = yield* Consumer
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
  commitInterval: config.commitInterval,
  shutdownTimeout: config.shutdownTimeout,
  sessionTimeout: config.sessionTimeout,
  heartbeatInterval: config.heartbeatInterval
})

export const layer = (options: ConsumerOptions): Layer.Layer<Consumer, never, KafkaClient.KafkaClient> =>
  Layer.effect(Consumer, make(options))

export const layerConfig: Layer.Layer<Consumer, KafkaConfig.KafkaConfigError, KafkaClient.KafkaClient> = Layer.effect(
  Consumer,
  Effect.flatMap(KafkaConfig.consumer, (config) => make(optionsFrom(config)))
)
