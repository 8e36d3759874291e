/**
 * KafkaProducer: send records to Kafka one at a time and let the service batch them.
 *
 * `send` puts the record in a bounded queue (waiting when it is full, so a fast caller cannot exhaust memory)
 * and completes when the broker has acked it, with its own partition and offset, or with a typed error. One fiber
 * drains the queue: it takes what is waiting, lingers until the oldest record has waited `linger` for a batch to
 * fill (a full batch leaves at once), and sends the batch as one request. A batch that fails with a retriable error
 * is sent again on a jittered exponential `Schedule`, up to `retries` times, before the next batch goes, so records
 * of one partition keep their order. With `lanes` above 1 there is a queue, a fiber and a producer connection per
 * lane, and each partition's records go through one lane. When the scope closes, the producer stops taking records, flushes what is pending, then
 * disconnects.
 *
 * @example
 * ```ts
 * import { Effect } from "effect"
 * import * as KafkaProducer from "kafka-effect/KafkaProducer"
 *
 * const program = Effect.gen(function* () {
 *   const metadata = yield* KafkaProducer.send({ topic: "events", key: "user-1", value: JSON.stringify({ n: 1 }) })
 *   yield* Effect.log(`written at ${metadata.partition}/${metadata.offset}`)
 * })
 * ```
 */
import {
  Cause,
  Clock,
  Context,
  Deferred,
  Duration,
  Effect,
  Exit,
  Fiber,
  FiberSet,
  Layer,
  Metric,
  Option,
  Queue,
  Random,
  Schedule,
  Schema,
  Tracer
} from "effect"
import * as Murmur2 from "./internal/murmur2.ts"
import * as KafkaClient from "./KafkaClient.ts"
import * as KafkaConfig from "./KafkaConfig.ts"
import * as Metrics from "./Metrics.ts"
import * as Observability from "./Observability.ts"

/** `send` after the producer's scope closed, or a record still queued when the flush timeout ran out. */
export class ProducerClosed extends Schema.TaggedError<ProducerClosed>()("ProducerClosed", {
  topic: Schema.String
}) {
  override get message() {
    return `the producer is closed; the record for ${this.topic} was not sent, or not acknowledged before the flush timeout`
  }
}

export type ProduceError = KafkaClient.KafkaError | ProducerClosed

/** A record for `send`; `topic` defaults to the producer's topic (`KAFKA_PRODUCER_TOPIC`). */
export interface OutgoingRecord extends Omit<KafkaClient.ProducerRecord, "topic" | "key"> {
  readonly topic?: string | undefined
  readonly key?: string | Uint8Array | null | undefined
}

/** How `send` treats one record. */
export interface SendOptions {
  /**
   * false: a failure of this record is not counted in `records_produce_failed_total`, because the caller stores
   * something in its place (the Processor's dead letter without its value, when the broker refused it as too large).
   * Default true
   */
  readonly countFailure?: boolean | undefined
}

export class KafkaProducer extends Context.Service<
  KafkaProducer,
  {
    /** Sends one record; succeeds once the broker acked it. */
    readonly send: (
      record: OutgoingRecord,
      options?: SendOptions | undefined
    ) => Effect.Effect<KafkaClient.RecordMetadata, ProduceError>
    /** Sends many; succeeds with each record's metadata in order, or fails with the first error. */
    readonly sendAll: (
      records: Iterable<OutgoingRecord>
    ) => Effect.Effect<ReadonlyArray<KafkaClient.RecordMetadata>, ProduceError>
    /**
     * Sends what waits at once, without lingering (as the Java client's `flush`), and waits until every record
     * sent before this call is acked or failed. Records sent while it waits do not linger either.
     */
    readonly flush: Effect.Effect<void>
  }
>()("kafka-effect/KafkaProducer") {}

export interface ProducerOptions {
  readonly topic: string
  readonly acks: KafkaConfig.Acks
  readonly idempotent: boolean
  readonly retries: number
  readonly linger: Duration.Duration
  readonly batchSize: number
  readonly queueCapacity: number
  /** first delay between tries of a failed batch; doubles, jittered. Default 100 ms */
  readonly retryBackoff?: Duration.Duration | undefined
  /** the longest delay between tries. Default 5 s */
  readonly retryBackoffMax?: Duration.Duration | undefined
  /**
   * the most bytes (keys, values, headers) of one request; a record larger than this goes alone. Default 1,000,000,
   * under the broker's default message.max.bytes (1,048,588), so that many small records never add up to a batch
   * the broker refuses as too large
   */
  readonly maxBatchBytes?: number | undefined
  /** how long closing the scope waits for pending records. Default 30 s */
  readonly flushTimeout?: Duration.Duration | undefined
  /** the codec of the record batches it writes (consumers read every one). Default none */
  readonly compression?: KafkaConfig.Compression | undefined
  /**
   * how many produce requests may be in flight at once. The producer keeps this many producer connections
   * ("lanes"), each with its own kafkajs producer (and producer id), queue and drain fiber; it picks each record's
   * partition itself (murmur2 of the key, as kafkajs' default partitioner; null keys round-robin) and sends all of a
   * partition's records through the same lane, so they are written in the order they were sent. Worth raising when
   * many records wait (many callers, `sendAll`, slow round trips); callers that each await their ack keep few
   * records in flight, and lanes split them into smaller requests. Default 1
   */
  readonly lanes?: number | undefined
}

interface Pending {
  readonly record: KafkaClient.ProducerRecord
  readonly done: Deferred.Deferred<KafkaClient.RecordMetadata, ProduceError>
  /** the caller's span, which the request's `kafka.produce` span links to */
  readonly span: Tracer.AnySpan | undefined
}

const noAttributes: Readonly<Record<string, unknown>> = Object.freeze({})

const textBytes = (value: string | Uint8Array | null | undefined) =>
  value === null || value === undefined ? 0 : typeof value === "string" ? Buffer.byteLength(value) : value.length

/** About what a record weighs in a request: key, value, headers, and a little framing. */
const recordBytes = (record: KafkaClient.ProducerRecord) => {
  let bytes = 24 + textBytes(record.key) + textBytes(record.value)
  if (record.headers !== undefined) {
    for (const [name, value] of Object.entries(record.headers)) {
      if (Array.isArray(value)) for (const one of value) bytes += 8 + name.length + textBytes(one)
      else bytes += 8 + name.length + textBytes(value as KafkaClient.HeaderValue)
    }
  }
  return bytes
}

/** The W3C trace-context header a record carries when it is sent inside a span. */
export const traceparentHeader = "traceparent"

const traceparentOf = (span: Tracer.AnySpan) => `00-${span.traceId}-${span.spanId}-${span.sampled ? "01" : "00"}`

/** The policy for retrying a failed batch: exponential from `backoff`, jittered to 80–120 %, capped at `max`. */
export const retrySchedule = (
  backoff: Duration.Duration,
  max: Duration.Duration
): Schedule.Schedule<Duration.Duration> =>
  Schedule.exponential(backoff, 2).pipe(
    Schedule.jittered,
    Schedule.modifyDelay(({ duration }) => Effect.succeed(Duration.min(duration, max)))
  )

/** A lane: one producer connection (its own kafkajs producer and producer id), its queue and its drain fiber. */
interface Lane {
  readonly connection: KafkaClient.ProducerConnection
  readonly queue: Queue.Queue<Pending, Cause.Done>
  /** the batch being sent */
  inFlight: ReadonlyArray<Pending>
  /** when the batch being sent left (epoch ms), retries included; undefined when none is */
  sendingSince: number | undefined
  /** records taken from the queue that did not fit in the last batch's bytes: the next batch starts with them */
  carried: ReadonlyArray<Pending>
  /** the lane completes its records in queue order, so this one completes last */
  lastEnqueued: Deferred.Deferred<KafkaClient.RecordMetadata, ProduceError> | undefined
  /** when the oldest record waiting in the queue was enqueued (epoch ms); undefined when none waits */
  waitingSince: number | undefined
  /** flushes in progress: while there are any, batches leave without lingering */
  flushes: number
  /** completed by a flush to end a linger in progress */
  wakeUp: Deferred.Deferred<void> | undefined
}

/** What the producer knows of a topic to choose each record's partition and lane. */
interface Route {
  partitions: number
  /** the counter that spreads null-keyed records over the partitions, round-robin */
  roundRobin: number
  /** added to the partition before choosing a lane, so that the partitions 0 of several topics do not share one */
  readonly laneOffset: number
}

/** How long a produce request may go unanswered (retries included) before the producer is not ready. */
const stalledAfter = Duration.seconds(30)

/** How often the partition counts of the topics in use are read again, as kafkajs' metadataMaxAge. */
const partitionCountMaxAge = Duration.minutes(5)

/** What is wrong with options given in code (`layer`, `make`), as the environment's are checked by `KafkaConfig`. */
const problemsOf = (options: ProducerOptions): Array<KafkaConfig.ConfigProblem> => {
  const problems: Array<KafkaConfig.ConfigProblem> = []
  const check = (name: string, value: unknown, ok: boolean, expected: string) => {
    if (!ok)
      problems.push(
        new KafkaConfig.ConfigProblem({ variable: `KafkaProducer option ${name}`, value: String(value), expected })
      )
  }
  const whole = (n: number | undefined, min: number) => n === undefined || (Number.isSafeInteger(n) && n >= min)
  check("acks", options.acks, [-1, 0, 1].includes(options.acks), "-1 (all), 0 or 1")
  check(
    "acks",
    options.acks,
    !options.idempotent || options.acks === -1,
    "-1 (all) when idempotent is true (an idempotent producer needs every in-sync replica's ack)"
  )
  check("batchSize", options.batchSize, whole(options.batchSize, 1), "a whole number ≥ 1")
  check("queueCapacity", options.queueCapacity, whole(options.queueCapacity, 1), "a whole number ≥ 1")
  check("retries", options.retries, whole(options.retries, 0), "a whole number ≥ 0")
  check("lanes", options.lanes, whole(options.lanes, 1), "a whole number ≥ 1")
  check("maxBatchBytes", options.maxBatchBytes, whole(options.maxBatchBytes, 1), "a whole number ≥ 1")
  return problems
}

/**
 * A producer's state: its options, its client, its lanes, what it knows of each topic, the sends waiting for a
 * topic's route. The stages below (routing, queueing, batching and the drain, closing) each take it first.
 */
interface State {
  readonly options: ProducerOptions
  readonly client: KafkaClient.KafkaClient["Service"]
  readonly laneCount: number
  readonly lanes: ReadonlyArray<Lane>
  /** what the producer knows of each topic in use (`readRoute`) */
  readonly routes: Map<string, Route>
  /** the sends of each topic whose route is being read, in the order they were made (`inLine`) */
  readonly lines: Map<string, Array<Waiting>>
  /** the fibers that read a topic's route and release the sends waiting for it (`release`) */
  readonly readers: FiberSet.FiberSet<void>
  /** the scope is closing: sends that would wait for a route are refused */
  closing: boolean
  readonly retry: Schedule.Schedule<Duration.Duration>
  readonly maxBatchBytes: number
  readonly lingerMillis: number
  readonly produced: (attributes: Readonly<Record<string, string>>) => Metric.Counter<number>
  readonly produceFailed: (attributes: Readonly<Record<string, string>>) => Metric.Counter<number>
  /** the completions of sends whose failure is not counted (`SendOptions.countFailure`) */
  readonly uncounted: WeakSet<Deferred.Deferred<KafkaClient.RecordMetadata, ProduceError>>
}

// ---------------------------------------------------------------------------------------------------------------
// Routing: which partition and lane a record goes to
// ---------------------------------------------------------------------------------------------------------------
// With several lanes the producer chooses each record's partition itself, as kafkajs' default partitioner would,
// to send all of a partition's records through one lane. That needs partition counts: read once per topic and
// again every `partitionCountMaxAge` (a topic can gain partitions). One lane leaves the choice to the client, and
// reads the count only to check the topic and explicit partitions (`readRoute`).
const partitionCount = (s: State, topic: string) =>
  s.client.admin.partitionCount(topic).pipe(
    Effect.flatMap((partitions) =>
      partitions > 0
        ? Effect.succeed(partitions)
        : Effect.fail(
            new KafkaClient.KafkaError({
              operation: "fetch topic metadata",
              topic,
              reason: new KafkaClient.UnknownTopic({ topic })
            })
          )
    ),
    // An unknown topic too: a topic created a moment ago may not be in the answering broker's metadata yet. One
    // that does not exist fails once the retries are spent.
    Effect.retry({
      schedule: s.retry,
      times: s.options.retries,
      while: (error) => error.retriable || error.reason._tag === "UnknownTopic"
    })
  )

const routeOf = (s: State, topic: string) =>
  Effect.flatMap(partitionCount(s, topic), (partitions) =>
    // Null-keyed records start at a random partition, as kafkajs' partitioner does, so short-lived producers
    // do not all begin with partition 0.
    Effect.map(Random.nextIntBetween(0, partitions - 1), (start) => {
      const known = s.routes.get(topic)
      if (known !== undefined) return known
      const route: Route = { partitions, roundRobin: start, laneOffset: s.routes.size }
      s.routes.set(topic, route)
      return route
    }).pipe(
      // The topic's counters from 0, so that its first failure is an increase that alerts see.
      Effect.tap(() => Metric.update(s.produced({ topic }), 0)),
      Effect.tap(() => Metric.update(s.produceFailed({ topic }), 0))
    )
  )

/** Reads the partition counts of the topics in use again every `partitionCountMaxAge` (lanes > 1). */
const refreshPartitionCounts = (s: State) =>
  Effect.forEach(
    s.routes,
    ([topic, route]) =>
      partitionCount(s, topic).pipe(
        Effect.tap((partitions) =>
          Effect.sync(() => {
            route.partitions = partitions
          })
        ),
        Effect.ignore
      ),
    { discard: true }
  ).pipe(Effect.delay(partitionCountMaxAge), Effect.forever)

/** The record's partition: its own, or its key's as kafkajs' default partitioner (murmur2), or round-robin. */
const partitionOf = (record: OutgoingRecord, route: Route) => {
  if (record.partition !== undefined) return record.partition
  const key = record.key
  if (key !== null && key !== undefined) return Murmur2.partitionForKey(key, route.partitions)
  route.roundRobin = (route.roundRobin + 1) % route.partitions
  return route.roundRobin
}

const partitionError = (topic: string, partition: number, detail: string) =>
  new KafkaClient.KafkaError({
    operation: "produce",
    topic,
    partition,
    reason: new KafkaClient.BrokerError({ type: "UNKNOWN_TOPIC_OR_PARTITION", retriable: false, detail })
  })

/** Whether a record can go without reading its topic's route: the topic is known, and its partition if it names one. */
const known = (route: Route | undefined, partition: number | undefined): route is Route =>
  route !== undefined &&
  (partition === undefined || (Number.isSafeInteger(partition) && partition >= 0 && partition < route.partitions))

/**
 * The topic's route: read on its first record (so a record for a topic that does not exist fails alone, not with
 * the batch it would have joined), and the partition count read again when a record names a partition beyond it
 * (the topic may have gained partitions). kafkajs leaves out the records of a partition it has no metadata for and
 * writes the rest of the request, which then fails as a whole (no answer for that partition) and would be sent
 * again: its other records twice.
 */
const readRoute = (s: State, topic: string): Effect.Effect<Route, KafkaClient.KafkaError> => {
  const route = s.routes.get(topic)
  if (route === undefined) return routeOf(s, topic)
  return Effect.map(partitionCount(s, topic), (partitions) => {
    route.partitions = partitions
    return route
  })
}

// ---------------------------------------------------------------------------------------------------------------
// Queueing: a send's record into its lane's queue, in send order
// ---------------------------------------------------------------------------------------------------------------
/**
 * Puts the record in its lane's queue, waiting while the queue is full, and succeeds once it is queued. `done` is
 * its completion, made before it is queued: a flush waits on it from the moment the record has a place in line.
 */
const enqueueTo = (
  s: State,
  fiber: Fiber.Fiber<unknown, unknown>,
  record: OutgoingRecord,
  topic: string,
  route: Route | undefined,
  span: Tracer.AnySpan | undefined,
  done: Deferred.Deferred<KafkaClient.RecordMetadata, ProduceError>
): Effect.Effect<void, ProducerClosed> => {
  const partition = route === undefined ? record.partition : partitionOf(record, route)
  const lane = (
    route === undefined || partition === undefined ? s.lanes[0] : s.lanes[(partition + route.laneOffset) % s.laneCount]
  ) as Lane
  // The caller's span travels with the record (W3C trace context), so its consumer continues the trace.
  const headers =
    span !== undefined && record.headers?.[traceparentHeader] === undefined
      ? { ...record.headers, [traceparentHeader]: traceparentOf(span) }
      : record.headers
  const pending: Pending = {
    record: { topic, key: record.key ?? null, value: record.value, headers, partition, timestamp: record.timestamp },
    done,
    span
  }
  // The lane's last record from here on, also while it waits for room (offers wait in line): a flush waits for it.
  // Interrupted while it waits, it never enters the queue, and the one before it is the lane's last again.
  const previous = lane.lastEnqueued
  lane.lastEnqueued = done
  const queued = () => {
    if (lane.waitingSince === undefined) lane.waitingSince = fiber.getRef(Clock.Clock).currentTimeMillisUnsafe()
  }
  // offerUnsafe refuses when the queue is full or ended; offer then waits for room, or says that it ended.
  if (Queue.offerUnsafe(lane.queue, pending)) return Effect.sync(queued)
  return Queue.offer(lane.queue, pending).pipe(
    Effect.onInterrupt(() =>
      Effect.sync(() => {
        if (lane.lastEnqueued === done) lane.lastEnqueued = previous
        Deferred.doneUnsafe(done, Exit.interrupt(fiber.id))
      })
    ),
    Effect.flatMap((offered) => {
      if (offered) return Effect.sync(queued)
      const closed = new ProducerClosed({ topic })
      Deferred.doneUnsafe(done, Exit.fail(closed))
      return Effect.fail(closed)
    })
  )
}

/**
 * Sends of a topic whose route is being read wait in that topic's line, in the order they were made, and one
 * fiber (`release`) reads the route once and queues them all in that order: a send made meanwhile joins the line
 * rather than overtake those in it. The line is a plain array walked by a loop, so however many sends wait, the
 * stack and the work to release them stay flat (sends that each awaited the one before nested one resumption in
 * the next, thousands deep).
 */
interface Waiting {
  readonly record: OutgoingRecord
  readonly span: Tracer.AnySpan | undefined
  readonly done: Deferred.Deferred<KafkaClient.RecordMetadata, ProduceError>
  /** succeeds once the record is queued; fails with why it was not */
  readonly queued: Deferred.Deferred<void, ProduceError>
  /** its caller was interrupted while it waited: it is not sent */
  cancelled: boolean
}

const countFailed = (s: State, done: Deferred.Deferred<KafkaClient.RecordMetadata, ProduceError>, topic: string) =>
  s.uncounted.has(done) ? Effect.void : Metric.update(s.produceFailed({ topic }), 1)

const refuse = (s: State, topic: string, waiting: Waiting, cause: Cause.Cause<ProduceError>) => {
  Deferred.doneUnsafe(waiting.queued, Exit.failCause(cause))
  // Refused before it was queued (no such topic or partition, or closed): a failed send all the same, counted once.
  return Deferred.doneUnsafe(waiting.done, Exit.failCause(cause)) ? countFailed(s, waiting.done, topic) : Effect.void
}

const release = (s: State, topic: string, line: Array<Waiting>) =>
  Effect.withFiber((fiber) =>
    Effect.flatMap(Effect.exit(readRoute(s, topic)), (read) => {
      let index = 0
      const next: Effect.Effect<void> = Effect.suspend(() => {
        // The line is dropped in the same synchronous step as its last entry is seen: a send that finds no line
        // goes straight to its lane, behind every record of this line.
        if (index >= line.length) {
          if (s.lines.get(topic) === line) s.lines.delete(topic)
          return Effect.void
        }
        const waiting = line[index++] as Waiting
        if (waiting.cancelled) {
          Deferred.doneUnsafe(waiting.done, Exit.interrupt())
          return next
        }
        const partition = waiting.record.partition
        // A failed read of a known topic's count (for a partition beyond it) fails only the sends that needed it.
        const route = Exit.isSuccess(read) ? read.value : s.routes.get(topic)
        if (route === undefined || (Exit.isFailure(read) && !known(route, partition))) {
          return Effect.andThen(
            refuse(s, topic, waiting, Exit.isFailure(read) ? read.cause : Cause.die("no route")),
            next
          )
        }
        if (partition !== undefined && partition >= route.partitions) {
          const detail = `partition ${partition} of ${topic} does not exist (it has ${route.partitions})`
          return Effect.andThen(refuse(s, topic, waiting, Cause.fail(partitionError(topic, partition, detail))), next)
        }
        return enqueueTo(
          s,
          fiber,
          waiting.record,
          topic,
          s.laneCount === 1 ? undefined : route,
          waiting.span,
          waiting.done
        ).pipe(
          Effect.matchEffect({
            onSuccess: () => Effect.sync(() => Deferred.doneUnsafe(waiting.queued, Exit.void)),
            onFailure: (closed) => refuse(s, topic, waiting, Cause.fail(closed))
          }),
          // This fiber interrupted while it offers (closing, past the flush timeout): the caller is told so.
          Effect.onInterrupt(() => refuse(s, topic, waiting, Cause.fail(new ProducerClosed({ topic })))),
          Effect.andThen(next)
        )
      })
      return next
    })
  )

/** Joins the topic's line (starting it, and its route read, if there is none); succeeds once the record is queued. */
const inLine = (
  s: State,
  topic: string,
  record: OutgoingRecord,
  span: Tracer.AnySpan | undefined,
  done: Deferred.Deferred<KafkaClient.RecordMetadata, ProduceError>
): Effect.Effect<void, ProduceError> => {
  const waiting: Waiting = { record, span, done, queued: Deferred.makeUnsafe(), cancelled: false }
  const joined = Deferred.await(waiting.queued).pipe(
    Effect.onInterrupt(() =>
      Effect.sync(() => {
        waiting.cancelled = true
      })
    )
  )
  // Joining a line and starting its reader are one uninterruptible step: a line without a reader would hold every
  // later send of its topic for ever.
  const join = Effect.suspend(() => {
    const line = s.lines.get(topic)
    if (line !== undefined) {
      line.push(waiting)
      return Effect.void
    }
    const started: Array<Waiting> = [waiting]
    s.lines.set(topic, started)
    return Effect.asVoid(FiberSet.run(s.readers, release(s, topic, started)))
  })
  return Effect.andThen(Effect.uninterruptible(join), joined)
}

/** Queues a record (waiting for its topic's route on first use) and succeeds with its completion. */
const enqueue = (
  s: State,
  record: OutgoingRecord,
  sendOptions?: SendOptions | undefined
): Effect.Effect<Deferred.Deferred<KafkaClient.RecordMetadata, ProduceError>, ProduceError> =>
  Effect.withFiber((fiber) => {
    const topic = record.topic ?? s.options.topic
    const partition = record.partition
    const done = Deferred.makeUnsafe<KafkaClient.RecordMetadata, ProduceError>()
    if (sendOptions?.countFailure === false) s.uncounted.add(done)
    const span = Context.getOrUndefined(fiber.context, Tracer.ParentSpan)
    // The path of almost every record: a known topic, no partition or one known to exist, nobody in line.
    if (s.lines.size === 0 || !s.lines.has(topic)) {
      const route = s.routes.get(topic)
      if (known(route, partition)) {
        return enqueueTo(s, fiber, record, topic, s.laneCount === 1 ? undefined : route, span, done).pipe(
          Effect.tapError(() => countFailed(s, done, topic)),
          Effect.as(done)
        )
      }
    }
    if (partition !== undefined && !(Number.isSafeInteger(partition) && partition >= 0)) {
      const error = partitionError(topic, partition, `partition ${partition} is not a whole number from 0`)
      return Effect.andThen(countFailed(s, done, topic), Effect.fail(error))
    }
    if (s.closing) return Effect.andThen(countFailed(s, done, topic), Effect.fail(new ProducerClosed({ topic })))
    return Effect.as(inLine(s, topic, record, span, done), done)
  })

const sendOne = (s: State, record: OutgoingRecord, sendOptions?: SendOptions) =>
  Effect.flatMap(enqueue(s, record, sendOptions), Deferred.await)

const sendMany = (s: State, records: Iterable<OutgoingRecord>) =>
  Effect.gen(function* () {
    const pending: Array<Deferred.Deferred<KafkaClient.RecordMetadata, ProduceError>> = []
    for (const record of records) pending.push(yield* enqueue(s, record))
    return yield* Effect.forEach(pending, Deferred.await)
  })

/**
 * What lingers leaves at once, and so does what is sent until every record sent before the flush is done: each
 * lane's last record (lanes complete in queue order; a record waiting for room counts) and the sends still waiting
 * for their topic's route.
 */
const flushLanes = (s: State) =>
  Effect.suspend(() => {
    const waiting: Array<Deferred.Deferred<KafkaClient.RecordMetadata, ProduceError>> = []
    for (const line of s.lines.values()) for (const entry of line) waiting.push(entry.done)
    if (waiting.length === 0 && s.lanes.every((lane) => lane.lastEnqueued === undefined)) return Effect.void
    // A failed or interrupted record is done too; an interrupted one never entered its queue, so the lane's last is
    // read again (the one before it, or one sent since).
    const ended = (done: Deferred.Deferred<KafkaClient.RecordMetadata, ProduceError>) =>
      Effect.map(
        Effect.exit(Deferred.await(done)),
        (exit) => Exit.isFailure(exit) && Cause.hasInterruptsOnly(exit.cause)
      )
    const flushLane = (lane: Lane) =>
      Effect.gen(function* () {
        let last = lane.lastEnqueued
        while (last !== undefined && (yield* ended(last)) && lane.lastEnqueued !== last) last = lane.lastEnqueued
      })
    return Effect.acquireUseRelease(
      Effect.sync(() => {
        for (const lane of s.lanes) {
          lane.flushes++
          if (lane.wakeUp !== undefined) Deferred.doneUnsafe(lane.wakeUp, Effect.void)
        }
      }),
      () =>
        Effect.andThen(
          Effect.forEach(waiting, ended, { discard: true }),
          Effect.forEach(s.lanes, flushLane, { concurrency: "unbounded", discard: true })
        ),
      () =>
        Effect.sync(() => {
          for (const lane of s.lanes) lane.flushes--
        })
    )
  })

// ---------------------------------------------------------------------------------------------------------------
// Batching and the drain: one fiber a lane takes batches and sends them
// ---------------------------------------------------------------------------------------------------------------
/** The longest prefix of `batch` within maxBatchBytes (at least one record); the rest is carried. */
const withinBytes = (s: State, lane: Lane, batch: ReadonlyArray<Pending>) => {
  let bytes = 0
  for (let index = 0; index < batch.length; index++) {
    bytes += recordBytes((batch[index] as Pending).record)
    if (bytes > s.maxBatchBytes && index > 0) {
      lane.carried = batch.slice(index)
      return batch.slice(0, index)
    }
  }
  return batch
}

/**
 * After a take: what is left is a full batch's overflow (takes take all that waits up to the batch size), whose
 * records arrived before now, so now is a safe start for their linger; an empty queue has nothing waiting.
 */
const taken = (lane: Lane) =>
  Effect.clockWith((clock) =>
    Effect.sync(() => {
      lane.waitingSince = Queue.sizeUnsafe(lane.queue) > 0 ? clock.currentTimeMillisUnsafe() : undefined
    })
  )

/**
 * The lane's next batch: what is waiting, plus what arrives until its oldest record has waited `linger` (without
 * waiting once it is full). Records that queued while the previous request was in flight have waited already:
 * counting the linger from the oldest, not from the take, keeps a busy lane from adding a linger to every request.
 */
const nextBatch = (s: State, lane: Lane) =>
  Effect.gen(function* () {
    if (lane.carried.length > 0) {
      const batch = lane.carried
      lane.carried = []
      return withinBytes(s, lane, batch)
    }
    const batch = yield* Queue.takeBetween(lane.queue, 1, s.options.batchSize)
    const oldest = lane.waitingSince
    yield* taken(lane)
    const missing = s.options.batchSize - batch.length
    if (missing === 0 || s.lingerMillis <= 0 || lane.flushes > 0) return withinBytes(s, lane, batch)
    const lingered = oldest === undefined ? 0 : (yield* Clock.currentTimeMillis) - oldest
    if (lingered >= s.lingerMillis) {
      return withinBytes(s, lane, batch)
    }
    // takeBetween takes atomically, so losing the race against the linger timer (or a flush) takes nothing.
    // A queue ended while lingering (the scope is closing) has nothing more to give: send what we hold.
    const wakeUp = Deferred.makeUnsafe<void>()
    lane.wakeUp = wakeUp
    const rest = yield* Queue.takeBetween(lane.queue, missing, missing).pipe(
      Effect.timeoutOption(Duration.millis(s.lingerMillis - lingered)),
      Effect.catch(() => Effect.succeedNone),
      Effect.raceFirst(Effect.as(Deferred.await(wakeUp), Option.none<Array<Pending>>())),
      Effect.ensuring(Effect.sync(() => (lane.wakeUp = undefined)))
    )
    if (Option.isSome(rest)) {
      yield* taken(lane)
      return withinBytes(s, lane, [...batch, ...rest.value])
    }
    const waiting = yield* Queue.size(lane.queue)
    if (waiting === 0) return withinBytes(s, lane, batch)
    const more = yield* Queue.takeBetween(lane.queue, 1, missing)
    yield* taken(lane)
    return withinBytes(s, lane, [...batch, ...more])
  })

/** One request of `batch`'s records, retriable failures tried again on the schedule; its outcome, with its time. */
const request = (s: State, lane: Lane, batch: ReadonlyArray<Pending>) =>
  Effect.suspend(() => {
    const records = new Array<KafkaClient.ProducerRecord>(batch.length)
    // The drain fiber has no span of its own: the request's span links to each caller's, so that a trace of a
    // send leads to the request that carried it.
    const links: Array<Tracer.SpanLink> = []
    for (let index = 0; index < batch.length; index++) {
      const pending = batch[index] as Pending
      records[index] = pending.record
      if (pending.span !== undefined) links.push({ span: pending.span, attributes: noAttributes })
    }
    return lane.connection.send(records).pipe(
      Effect.tapError((error) =>
        error.retriable ? Effect.logWarning(`produce failed, will retry: ${error.message}`) : Effect.void
      ),
      // An unknown topic too: its first record found it (`readRoute`), so now it is being re-created, or the
      // answering broker has not heard of it yet (kafkajs itself deems that error retriable); deleted, it fails
      // after the retries.
      Effect.retry({
        schedule: s.retry,
        times: s.options.retries,
        while: (error) => error.retriable || error.reason._tag === "UnknownTopic"
      }),
      Effect.withSpan(
        "kafka.produce",
        {
          kind: "producer",
          attributes: { "messaging.system": "kafka", "messaging.batch.message_count": batch.length },
          links
        },
        // The drain fiber's stack says nothing about the callers, and capturing it costs an Error per request.
        { captureStackTrace: false }
      ),
      Effect.timed,
      Effect.exit
    )
  })

/** Completes each caller of `batch` with its metadata, or all of them with the request's failure. */
const complete = (
  s: State,
  batch: ReadonlyArray<Pending>,
  exit: Exit.Exit<[Duration.Duration, ReadonlyArray<KafkaClient.RecordMetadata>], KafkaClient.KafkaError>
) =>
  Effect.suspend(() => {
    // Each record is counted once, by whoever completes it: a record that closing failed at the flush timeout
    // (ProducerClosed, counted there) is not counted again when its request answers after all.
    const perTopic = new Map<string, number>()
    const count = (pending: Pending) =>
      perTopic.set(pending.record.topic, (perTopic.get(pending.record.topic) ?? 0) + 1)
    if (Exit.isSuccess(exit)) {
      const metadata = exit.value[1]
      for (let index = 0; index < batch.length; index++) {
        const pending = batch[index] as Pending
        if (Deferred.doneUnsafe(pending.done, Exit.succeed(metadata[index] as KafkaClient.RecordMetadata))) {
          count(pending)
        }
      }
    } else {
      const failed = Exit.failCause(exit.cause)
      for (const pending of batch) {
        if (Deferred.doneUnsafe(pending.done, failed) && !s.uncounted.has(pending.done)) count(pending)
      }
      // A topic deleted since its route was read: the next record for it reads it again, and fails alone.
      const error = Cause.findErrorOption(exit.cause)
      if (Option.isSome(error) && error.value.reason._tag === "UnknownTopic") s.routes.delete(error.value.reason.topic)
    }
    const counter = Exit.isSuccess(exit) ? s.produced : s.produceFailed
    return Effect.forEach(perTopic, ([topic, n]) => Metric.update(counter({ topic }), n), { discard: true }).pipe(
      Effect.andThen(
        Exit.isSuccess(exit) ? Metric.update(Metrics.produceLatency, Duration.toSeconds(exit.value[0])) : Effect.void
      )
    )
  })

/**
 * Sends a batch and completes its callers, each with its own outcome where the request's failure may not be
 * theirs. A request that failed for good (or after its retries) holding several topics is sent again topic by
 * topic, so a topic that is deleted, not authorised or unreachable fails its own records only. One of a single
 * topic that failed for good is sent again record by record: kafkajs fails a whole answer on the first partition's
 * error (a record too large for its topic's `max.message.bytes`), which would fail its batch-mates too — unless
 * the topic is unknown, which all of its records share. Resends go in order, so a partition keeps its order;
 * records of partitions the failed request had written may be stored twice (at-least-once).
 */
const sendBatch = (s: State, lane: Lane, batch: ReadonlyArray<Pending>): Effect.Effect<void> =>
  Effect.flatMap(request(s, lane, batch), (exit) => {
    if (batch.length === 1 || Exit.isSuccess(exit)) return complete(s, batch, exit)
    const byTopic = new Map<string, Array<Pending>>()
    for (const pending of batch) {
      const of = byTopic.get(pending.record.topic)
      if (of === undefined) byTopic.set(pending.record.topic, [pending])
      else of.push(pending)
    }
    if (byTopic.size > 1) {
      return Effect.forEach(byTopic.values(), (records) => sendBatch(s, lane, records), { discard: true })
    }
    const error = Cause.findErrorOption(exit.cause)
    if (Option.isSome(error) && !error.value.retriable && error.value.reason._tag !== "UnknownTopic") {
      return Effect.forEach(
        batch,
        (pending) => Effect.flatMap(request(s, lane, [pending]), (one) => complete(s, [pending], one)),
        { discard: true }
      )
    }
    return complete(s, batch, exit)
  })

// Each lane sends one batch at a time and retries it before the next, so the records of a partition (always
// the same lane) are written in the order they were sent; the lanes' requests are in flight together.
const drain = (s: State, lane: Lane) =>
  Effect.gen(function* () {
    // Ends when the queue is ended and empty (takeBetween fails) — never with records carried over.
    while (true) {
      const batch = yield* nextBatch(s, lane)
      lane.inFlight = batch
      lane.sendingSince = yield* Clock.currentTimeMillis
      yield* Effect.uninterruptible(sendBatch(s, lane, batch))
      lane.inFlight = []
      lane.sendingSince = undefined
    }
  }).pipe(Effect.catchCause(() => Effect.void))

// ---------------------------------------------------------------------------------------------------------------
// Readiness and closing
// ---------------------------------------------------------------------------------------------------------------
/**
 * Readiness follows the sends: a batch that has had no answer (its retries included) for `stalledAfter` makes the
 * producer not ready, with the reason, until it ends: a hung broker neither refuses nor answers.
 */
const watchStalls = (s: State) => {
  let stalled: string | undefined
  return Effect.repeat(
    Effect.gen(function* () {
      const now = yield* Clock.currentTimeMillis
      let oldest = now
      for (const lane of s.lanes) if (lane.sendingSince !== undefined) oldest = Math.min(oldest, lane.sendingSince)
      const was = stalled
      stalled =
        now - oldest > Duration.toMillis(stalledAfter)
          ? `a produce request unanswered for ${Math.round((now - oldest) / 1000)} s`
          : undefined
      if (stalled !== was) yield* Observability.report("producer", stalled === undefined, stalled)
    }),
    Schedule.spaced("1 second")
  )
}

/** Refuses every send still in a line (closing): ProducerClosed, but for those whose caller is gone. */
const refuseLines = (s: State) =>
  Effect.gen(function* () {
    for (const [topic, line] of s.lines) {
      for (const waiting of line) {
        if (waiting.cancelled) Deferred.doneUnsafe(waiting.done, Exit.interrupt())
        else if (!Deferred.isDoneUnsafe(waiting.queued)) {
          yield* refuse(s, topic, waiting, Cause.fail(new ProducerClosed({ topic })))
        }
      }
    }
    s.lines.clear()
  })

/**
 * Closing: nothing lingers from here on; sends waiting for a route are queued first (or refused), then the queues
 * end and the lanes drain, all within the flush timeout. Past it, every caller still waiting (for a route, for room
 * in a queue, for an answer) fails with `ProducerClosed`.
 */
const close = (s: State, drainers: ReadonlyArray<Fiber.Fiber<void>>) =>
  Effect.gen(function* () {
    s.closing = true
    // Nothing lingers from here on.
    for (const lane of s.lanes) {
      lane.flushes++
      if (lane.wakeUp !== undefined) Deferred.doneUnsafe(lane.wakeUp, Effect.void)
    }
    // Sends waiting for a route are queued first (or refused), then the queues end and drain; all within the
    // flush timeout.
    const flushed = yield* FiberSet.awaitEmpty(s.readers).pipe(
      Effect.andThen(Effect.forEach(s.lanes, (lane) => Queue.end(lane.queue), { discard: true })),
      Effect.andThen(Fiber.joinAll(drainers)),
      Effect.timeoutOption(s.options.flushTimeout ?? Duration.seconds(30))
    )
    // Nothing waits in a line once its reader is done; should a send still be there, it is told, not left waiting.
    if (Option.isSome(flushed)) yield* refuseLines(s)
    if (Option.isNone(flushed)) {
      yield* FiberSet.clear(s.readers)
      yield* refuseLines(s)
      for (const lane of s.lanes) yield* Queue.end(lane.queue)
      // Not waited for: a batch being sent goes on (uninterruptible) with its retries and back-offs, which could
      // outlast the flush timeout by minutes; its callers are failed below, and the fiber ends after that batch.
      yield* Effect.forkDetach(Fiber.interruptAll(drainers))
      const abandoned: Array<Pending> = []
      for (const lane of s.lanes) {
        abandoned.push(...lane.inFlight, ...lane.carried)
        // Clearing makes room, which lets in the sends that waited for it: clear until nothing comes, then shut
        // the queue so that a send still waiting is refused (ProducerClosed) rather than left waiting for ever.
        while (true) {
          const waiting = yield* Queue.clear(lane.queue)
          if (waiting.length === 0) break
          abandoned.push(...waiting)
        }
        yield* Queue.shutdown(lane.queue)
      }
      yield* Effect.logWarning(
        `producer closed with ${abandoned.length} records unsent or unacknowledged after the flush timeout`
      )
      for (const pending of abandoned) {
        // A record whose batch was completed meanwhile (its ack or error came) is counted there.
        if (Deferred.isDoneUnsafe(pending.done)) continue
        Deferred.doneUnsafe(pending.done, Effect.fail(new ProducerClosed({ topic: pending.record.topic })))
        yield* countFailed(s, pending.done, pending.record.topic)
      }
    }
  })

/** A lane: its producer connection, a bounded queue of its share of the capacity, and nothing in flight yet. */
const makeLane = (client: KafkaClient.KafkaClient["Service"], options: ProducerOptions, capacity: number) =>
  Effect.gen(function* () {
    const connection = yield* client.producer({
      idempotent: options.idempotent,
      acks: options.acks,
      compression: options.compression
    })
    const queue = yield* Queue.bounded<Pending, Cause.Done>(capacity)
    const lane: Lane = {
      connection,
      queue,
      inFlight: [],
      sendingSince: undefined,
      carried: [],
      lastEnqueued: undefined,
      waitingSince: undefined,
      flushes: 0,
      wakeUp: undefined
    }
    return lane
  })

// ---------------------------------------------------------------------------------------------------------------
// The service
// ---------------------------------------------------------------------------------------------------------------
export const make = Effect.fnUntraced(function* (options: ProducerOptions) {
  // A batch size of 0 would drain empty batches for ever; acks other than all would fail every idempotent send.
  const problems = problemsOf(options)
  if (problems.length > 0) return yield* new KafkaConfig.KafkaConfigError({ problems })
  const client = yield* KafkaClient.KafkaClient
  const laneCount = Math.max(1, Math.floor(options.lanes ?? defaultLanes))
  // The bound holds for all lanes together: each lane's queue takes its share.
  const laneCapacity = Math.max(1, Math.ceil(options.queueCapacity / laneCount))
  const lanes = yield* Effect.forEach(
    Array.from({ length: laneCount }),
    () => makeLane(client, options, laneCapacity),
    { concurrency: "unbounded" }
  )
  yield* Observability.report("producer", true)
  yield* Effect.addFinalizer(() => Observability.report("producer", false))
  const s: State = {
    options,
    client,
    laneCount,
    lanes,
    routes: new Map(),
    lines: new Map(),
    // Made before `close` is added, so that the readers are interrupted after it (finalizers run in reverse), not
    // before it waits for them.
    readers: yield* FiberSet.make<void>(),
    closing: false,
    retry: retrySchedule(options.retryBackoff ?? Duration.millis(100), options.retryBackoffMax ?? Duration.seconds(5)),
    maxBatchBytes: options.maxBatchBytes ?? 1_000_000,
    lingerMillis: Duration.toMillis(options.linger),
    produced: Metrics.tagged(Metrics.recordsProduced),
    produceFailed: Metrics.tagged(Metrics.recordsProduceFailed),
    uncounted: new WeakSet()
  }
  yield* Effect.forkScoped(watchStalls(s))
  const drainers = yield* Effect.forEach(lanes, (lane) => Effect.forkDetach(drain(s, lane)))
  yield* Effect.addFinalizer(() => close(s, drainers))
  if (laneCount > 1) yield* Effect.forkScoped(refreshPartitionCounts(s))
  return KafkaProducer.of({
    send: (record, sendOptions) => sendOne(s, record, sendOptions),
    sendAll: (records) => sendMany(s, records),
    flush: flushLanes(s)
  })
})

/**
 * Lanes unless `lanes` says otherwise. One: measured on one broker, callers that await each ack keep only so many
 * records in flight, and several lanes split them into more, smaller requests (see bench/producer.ts).
 */
export const defaultLanes = 1

/** The defaults of `layer`: the same as the environment's defaults (`KafkaConfig.producer`). */
export const defaults: ProducerOptions = {
  topic: "events",
  acks: -1,
  idempotent: true,
  retries: 3,
  linger: Duration.millis(5),
  batchSize: 500,
  queueCapacity: 10_000
}

/** The KafkaProducer with explicit options; what is left out takes its default (`defaults`). */
export const layer = (
  options: Partial<ProducerOptions> = {}
): Layer.Layer<KafkaProducer, KafkaClient.KafkaError | KafkaConfig.KafkaConfigError, KafkaClient.KafkaClient> =>
  Layer.effect(KafkaProducer, make({ ...defaults, ...options }))

/** The KafkaProducer configured from the environment (`KafkaConfig.producer`). */
export const layerConfig: Layer.Layer<
  KafkaProducer,
  KafkaClient.KafkaError | KafkaConfig.KafkaConfigError,
  KafkaClient.KafkaClient
> = Layer.effect(KafkaProducer, Effect.flatMap(KafkaConfig.producer, make))

/** Sends one record with the KafkaProducer in context. */
export const send = (
  record: OutgoingRecord,
  options?: SendOptions | undefined
): Effect.Effect<KafkaClient.RecordMetadata, ProduceError, KafkaProducer> =>
  Effect.gen(function* () {
    const producer = yield* KafkaProducer
    return yield* producer.send(record, options)
  })

/** Flushes the KafkaProducer in context: what lingers leaves at once; waits for everything sent so far. */
export const flush: Effect.Effect<void, never, KafkaProducer> = Effect.gen(function* () {
  const producer = yield* KafkaProducer
  return yield* producer.flush
})

/** Sends many records with the KafkaProducer in context. */
export const sendAll = (
  records: Iterable<OutgoingRecord>
): Effect.Effect<ReadonlyArray<KafkaClient.RecordMetadata>, ProduceError, KafkaProducer> =>
  Effect.gen(function* () {
    const producer = yield* KafkaProducer
    return yield* producer.sendAll(records)
  })

/**
 * A topic whose values are encoded to JSON by a `Schema`.
 *
 * @example
 * ```ts
 * const Orders = KafkaProducer.typedTopic("orders", Order)
 * yield* Orders.send(order, { key: order.id })
 * ```
 */
export const typedTopic = <
  S extends Schema.Top & { readonly DecodingServices: never; readonly EncodingServices: never }
>(
  topic: string,
  schema: S
) => {
  const encode = Schema.encodeEffect(Schema.fromJsonString(schema))
  return {
    topic,
    schema,
    send: (
      value: S["Type"],
      options?: { readonly key?: string | Uint8Array | null; readonly headers?: KafkaClient.Headers }
    ): Effect.Effect<KafkaClient.RecordMetadata, ProduceError | Schema.SchemaError, KafkaProducer> =>
      Effect.flatMap(encode(value), (json) =>
        send({ topic, value: json as string, key: options?.key ?? null, headers: options?.headers })
      )
  }
}
