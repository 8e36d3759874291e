/**
 * KafkaProducer: send records to Kafka one at a time and let the service batch them.
 *
 * `send` puts the record in a bounded queue (waiting when it is full, so a fast caller cannot exhaust memory)
 * and completes when the broker has acked it, with its own partition and offset, or with a typed error. One fiber
 * drains the queue: it takes what is waiting, lingers up to `linger` for a batch to fill (a full batch leaves at
 * once), and sends the batch as one request. A batch that fails with a retriable error is sent again on a
 * jittered exponential `Schedule`, up to `retries` times, before the next batch goes, so records of one key keep
 * their order. When the scope closes, the producer stops taking records, flushes what is pending, then
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
  type Cause,
  Context,
  Deferred,
  Duration,
  Effect,
  Exit,
  Fiber,
  Layer,
  Metric,
  Option,
  Queue,
  Schedule,
  Schema,
  Tracer
} from "effect"
import * as KafkaConfig from "./Config.ts"
import * as KafkaClient from "./KafkaClient.ts"
import * as Metrics from "./Metrics.ts"
import * as Observability from "./Observability.ts"

/** `send` after the producer's scope closed, or a record still queued when the flush timeout ran out. */
export class ProducerClosed extends Schema.TaggedError<ProducerClosed>()("ProducerClosed", {
  topic: Schema.String
}) {
  override get message() {
    return `the producer is closed; the record for ${this.topic} was not sent`
  }
}

export type ProduceError = KafkaClient.KafkaError | ProducerClosed

/** A record for `send`; `topic` defaults to the producer's topic (`KAFKA_PRODUCER_TOPIC`). */
export interface OutgoingRecord extends Omit<KafkaClient.ProducerRecord, "topic" | "key"> {
  readonly topic?: string | undefined
  readonly key?: string | Uint8Array | null | undefined
}

export class KafkaProducer extends Context.Service<
  KafkaProducer,
  {
    /** Sends one record; succeeds once the broker acked it. */
    readonly send: (record: OutgoingRecord) => Effect.Effect<KafkaClient.RecordMetadata, ProduceError>
    /** Sends many; succeeds with each record's metadata in order, or fails with the first error. */
    readonly sendAll: (
      records: Iterable<OutgoingRecord>
    ) => Effect.Effect<ReadonlyArray<KafkaClient.RecordMetadata>, ProduceError>
    /** Waits until every record sent before this call is acked or failed. */
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
}

interface Pending {
  readonly record: KafkaClient.ProducerRecord
  readonly done: Deferred.Deferred<KafkaClient.RecordMetadata, ProduceError>
}

const textBytes = (value: string | Uint8Array | null | undefined) =>
  value === null || value === undefined ? 0 : typeof value === "string" ? Buffer.byteLength(value) : value.length

/** About what a record weighs in a request: key, value, headers, and a little framing. */
const recordBytes = (record: KafkaClient.ProducerRecord) => {
  let bytes = 24 + textBytes(record.key) + textBytes(record.value)
  if (record.headers !== undefined) {
    for (const [name, value] of Object.entries(record.headers)) bytes += 8 + name.length + textBytes(value)
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

export const make = Effect.fnUntraced(function* (options: ProducerOptions) {
  const client = yield* KafkaClient.KafkaClient
  const connection = yield* client.producer({ idempotent: options.idempotent, acks: options.acks })
  yield* Observability.report("producer", true)
  yield* Effect.addFinalizer(() => Observability.report("producer", false))
  const produced = Metrics.tagged(Metrics.recordsProduced)
  const produceFailed = Metrics.tagged(Metrics.recordsProduceFailed)
  const queue = yield* Queue.bounded<Pending, Cause.Done>(options.queueCapacity)
  const retry = retrySchedule(
    options.retryBackoff ?? Duration.millis(100),
    options.retryBackoffMax ?? Duration.seconds(5)
  )
  let inFlight: ReadonlyArray<Pending> = []
  let lastEnqueued: Deferred.Deferred<KafkaClient.RecordMetadata, ProduceError> | undefined

  const sendBatch = (batch: ReadonlyArray<Pending>) =>
    connection.send(batch.map((pending) => pending.record)).pipe(
      Effect.tapError((error) =>
        error.retriable ? Effect.logWarning(`produce failed, will retry: ${error.message}`) : Effect.void
      ),
      Effect.retry({ schedule: retry, times: options.retries, while: (error) => error.retriable }),
      Effect.withSpan("kafka.produce", {
        kind: "producer",
        attributes: { "messaging.system": "kafka", "messaging.batch.message_count": batch.length }
      }),
      Effect.timed,
      Effect.exit,
      Effect.flatMap((exit) =>
        Effect.gen(function* () {
          for (const [index, pending] of batch.entries()) {
            Deferred.doneUnsafe(
              pending.done,
              Exit.isSuccess(exit)
                ? Effect.succeed(exit.value[1][index] as KafkaClient.RecordMetadata)
                : Effect.failCause(exit.cause)
            )
          }
          const perTopic = new Map<string, number>()
          for (const pending of batch) perTopic.set(pending.record.topic, (perTopic.get(pending.record.topic) ?? 0) + 1)
          const counter = Exit.isSuccess(exit) ? produced : produceFailed
          for (const [topic, n] of perTopic) yield* Metric.update(counter({ topic }), n)
          if (Exit.isSuccess(exit)) yield* Metric.update(Metrics.produceLatency, Duration.toSeconds(exit.value[0]))
        })
      )
    )

  // Records taken from the queue that did not fit in the last batch's bytes: the next batch starts with them.
  let carried: ReadonlyArray<Pending> = []
  const maxBatchBytes = options.maxBatchBytes ?? 1_000_000

  /** The longest prefix of `batch` within maxBatchBytes (at least one record); the rest is carried. */
  const withinBytes = (batch: ReadonlyArray<Pending>) => {
    let bytes = 0
    for (const [index, pending] of batch.entries()) {
      bytes += recordBytes(pending.record)
      if (bytes > maxBatchBytes && index > 0) {
        carried = batch.slice(index)
        return batch.slice(0, index)
      }
    }
    return batch
  }

  /** The next batch: what is waiting, plus what arrives within `linger` (without waiting once it is full). */
  const nextBatch = Effect.gen(function* () {
    if (carried.length > 0) {
      const batch = carried
      carried = []
      return withinBytes(batch)
    }
    const batch = yield* Queue.takeBetween(queue, 1, options.batchSize)
    const missing = options.batchSize - batch.length
    if (missing === 0 || Duration.isZero(options.linger)) return withinBytes(batch)
    // takeBetween takes atomically, so losing the race against the linger timer takes nothing.
    // A queue ended while lingering (the scope is closing) has nothing more to give: send what we hold.
    const rest = yield* Queue.takeBetween(queue, missing, missing).pipe(
      Effect.timeoutOption(options.linger),
      Effect.catch(() => Effect.succeedNone)
    )
    if (Option.isSome(rest)) return withinBytes([...batch, ...rest.value])
    const waiting = yield* Queue.size(queue)
    return withinBytes(waiting === 0 ? batch : [...batch, ...(yield* Queue.takeBetween(queue, 1, missing))])
  })

  const drain = Effect.gen(function* () {
    // Ends when the queue is ended and empty (takeBetween fails) — never with records carried over.
    while (true) {
      const batch = yield* nextBatch
      inFlight = batch
      yield* Effect.uninterruptible(sendBatch(batch))
      inFlight = []
    }
  }).pipe(Effect.catchCause(() => Effect.void))

  const drainer = yield* Effect.forkDetach(drain)

  yield* Effect.addFinalizer(() =>
    Effect.gen(function* () {
      yield* Queue.end(queue)
      const flushed = yield* Fiber.join(drainer).pipe(
        Effect.timeoutOption(options.flushTimeout ?? Duration.seconds(30))
      )
      if (Option.isNone(flushed)) {
        yield* Fiber.interrupt(drainer)
        const abandoned = [...inFlight, ...carried, ...(yield* Queue.clear(queue))]
        yield* Effect.logWarning(`producer closed with ${abandoned.length} records unsent after the flush timeout`)
        for (const pending of abandoned) {
          Deferred.doneUnsafe(pending.done, Effect.fail(new ProducerClosed({ topic: pending.record.topic })))
        }
      }
    })
  )

  const enqueue = (record: OutgoingRecord) =>
    Effect.gen(function* () {
      const topic = record.topic ?? options.topic
      const done = yield* Deferred.make<KafkaClient.RecordMetadata, ProduceError>()
      // The caller's span travels with the record (W3C trace context), so its consumer continues the trace.
      const span = yield* Effect.serviceOption(Tracer.ParentSpan)
      const headers =
        Option.isSome(span) && record.headers?.[traceparentHeader] === undefined
          ? { ...record.headers, [traceparentHeader]: traceparentOf(span.value) }
          : record.headers
      const accepted = yield* Queue.offer(queue, {
        record: { ...record, topic, key: record.key ?? null, headers },
        done
      })
      if (!accepted) return yield* new ProducerClosed({ topic })
      lastEnqueued = done
      return done
    })

  const send = (record: OutgoingRecord) => Effect.flatMap(enqueue(record), Deferred.await)

  const sendAll = (records: Iterable<OutgoingRecord>) =>
    Effect.gen(function* () {
      const pending: Array<Deferred.Deferred<KafkaClient.RecordMetadata, ProduceError>> = []
      for (const record of records) pending.push(yield* enqueue(record))
      return yield* Effect.forEach(pending, Deferred.await)
    })

  // Batches complete in queue order, so the last record enqueued is the last to complete.
  const flush = Effect.suspend(() =>
    lastEnqueued === undefined ? Effect.void : Effect.ignore(Deferred.await(lastEnqueued))
  )

  return KafkaProducer.of({ send, sendAll, flush })
})

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
): Layer.Layer<KafkaProducer, KafkaClient.KafkaError, KafkaClient.KafkaClient> =>
  Layer.effect(KafkaProducer, make({ ...defaults, ...options }))

/** The KafkaProducer configured from the environment (`KafkaConfig.producer`). */
export const layerConfig: Layer.Layer<
  KafkaProducer,
  KafkaClient.KafkaError | KafkaConfig.KafkaConfigError,
  KafkaClient.KafkaClient
> = Layer.effect(KafkaProducer, Effect.flatMap(KafkaConfig.producer, make))

/** Sends one record with the KafkaProducer in context. */
export const send = (record: OutgoingRecord): Effect.Effect<KafkaClient.RecordMetadata, ProduceError, KafkaProducer> =>
  Effect.gen(function* () {
    const producer = yield* KafkaProducer
    return yield* producer.send(record)
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
