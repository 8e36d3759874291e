/**
 * Processor: typed handlers per topic over the Consumer, with in-place retries, the retry-topic ladder and the
 * dead-letter topic (docs/guarantees.md, Processor).
 *
 * For each record the processor decodes the value (UTF-8 JSON, then the handler's `Schema`) and the headers (an
 * optional `Schema`), then runs the handler. The outcome is one of:
 * - **done**: the handler succeeded, maybe after short in-place retries (`inPlaceRetry`);
 * - **retried**: a retryable failure (the default for handler errors, and for defects) that in-place retries did
 *   not cure goes to the next retry topic (`RetryPolicy`), where a consumer of its own group handles it again once
 *   the topic's delay has passed, without holding up other partitions or topics;
 * - **dead-lettered**: a fatal failure — undecodable bytes, a `Schema` violation, a `Processor.Fatal` error or one
 *   the handler's `fatal` predicate marks — or a retryable one after the last retry topic goes to the DLQ.
 * Retry and dead-letter records keep the key, value and headers and add the history headers of `RetryPolicy`. A
 * record counts as finished — and its offset may be committed — only once the retry or dead-letter produce is
 * acked; that produce is tried until it succeeds (or shutdown), so the partition never skips a record.
 *
 * @example
 * ```ts
 * const orders = Processor.handler({
 *   topic: "orders",
 *   value: Order,
 *   handle: ({ value }) => chargeCustomer(value),
 *   fatal: (error) => error._tag === "CardRejected"
 * })
 * const program = Processor.run([orders]).pipe(
 *   Effect.provide(Processor.layerConfig),
 *   Effect.provide(KafkaProducer.layerConfig),
 *   Effect.provide(KafkaClient.layerConfig)
 * )
 * ```
 */
import {
  Cause,
  Clock,
  Context,
  Duration,
  Effect,
  Exit,
  Layer,
  Metric,
  Option,
  Schedule,
  Schema,
  type Tracer
} from "effect"
import { Headers, HttpTraceContext } from "effect/http"
import { prettyCause } from "./internal/cause.ts"
import { coordinates, increment } from "./internal/records.ts"
import * as KafkaClient from "./KafkaClient.ts"
import * as KafkaConfig from "./KafkaConfig.ts"
import * as KafkaConsumer from "./KafkaConsumer.ts"
import * as KafkaProducer from "./KafkaProducer.ts"
import * as Metrics from "./Metrics.ts"
import * as Observability from "./Observability.ts"
import * as RetryPolicy from "./RetryPolicy.ts"

// ---------------------------------------------------------------------------------------------------------------
// Errors
// ---------------------------------------------------------------------------------------------------------------

/** A handler's way to say "trying again cannot help": the record goes straight to the dead-letter topic. */
export class Fatal extends Schema.TaggedError<Fatal>()("Fatal", {
  reason: Schema.String
}) {
  override get message() {
    return this.reason
  }
}

/** Main, retry or dead-letter topics that do not exist, and the processor may not create them. */
export class TopicsMissing extends Schema.TaggedError<TopicsMissing>()("TopicsMissing", {
  topics: Schema.Array(Schema.String)
}) {
  override get message() {
    return `topics missing: ${this.topics.join(", ")}; create them, or set KAFKA_CREATE_TOPICS=true to let the processor create them`
  }
}

/** Why a record could not be handled: the tag and message go to the retry and dead-letter headers. */
export interface Failure extends RetryPolicy.Failure {
  readonly fatal: boolean
}

/** The tags of the decoding failures, all fatal. */
export type DecodeFailureTag = "NullValue" | "InvalidUtf8" | "InvalidJson" | "SchemaViolation" | "InvalidHeaders"

const decodeFailure = (tag: DecodeFailureTag, message: string): Failure => ({ tag, message, fatal: true })

// ---------------------------------------------------------------------------------------------------------------
// Handlers
// ---------------------------------------------------------------------------------------------------------------

/** A decoded record, as a handler sees it. */
export interface Message<A, H = Readonly<Record<string, string>>> {
  readonly value: A
  /** the key as UTF-8 text */
  readonly key: string | null
  /** the headers as UTF-8 text (decoded by the handler's headers `Schema` when it has one) */
  readonly headers: H
  /** how many times the record failed before (0 on the main topic, n on retry topic n) */
  readonly attempt: number
  /** the record as read: topic, partition, offset, bytes */
  readonly record: KafkaClient.ConsumedRecord
}

/** A handler registered for a topic, its failures classified; made by `handler`. */
export interface TopicHandler<R> {
  readonly topic: string
  /** decodes and handles the record; fails with the classified failure, defects included */
  readonly process: (record: KafkaClient.ConsumedRecord, attempt: number) => Effect.Effect<void, Failure, R>
}

type Decodable = Schema.Top & { readonly DecodingServices: never }
const HeaderText = Schema.Record(Schema.String, Schema.String)

const utf8 = new TextDecoder("utf-8", { fatal: true })
const lenient = new TextDecoder()

/** The tag and message of any error a handler fails with. */
export const describe = (error: unknown): RetryPolicy.Failure => {
  if (typeof error === "object" && error !== null) {
    const tag =
      "_tag" in error && typeof error._tag === "string" ? error._tag : error instanceof Error ? error.name : "Error"
    const message =
      "message" in error && typeof error.message === "string" && error.message !== "" ? error.message : String(error)
    return { tag, message }
  }
  return { tag: "Error", message: String(error) }
}

/**
 * Registers a handler for a topic: values are JSON decoded by `value`, headers optionally by `headers`.
 * Handler errors are retryable unless they are `Processor.Fatal` or `fatal(error)` holds.
 *
 * @example
 * ```ts
 * Processor.handler({ topic: "events", value: Event.Event, handle: ({ value }) => Effect.log(value.type) })
 * ```
 */
export const handler = <S extends Decodable, E = never, R = never, HS extends Decodable = typeof HeaderText>(options: {
  readonly topic: string
  readonly value: S
  readonly headers?: HS | undefined
  readonly handle: (message: Message<S["Type"], HS["Type"]>) => Effect.Effect<void, E, R>
  /** whether a handler error is fatal (dead-lettered at once); `Processor.Fatal` always is */
  readonly fatal?: ((error: E) => boolean) | undefined
}): TopicHandler<R> => {
  const decodeValue = Schema.decodeUnknownEffect(options.value)
  const decodeHeaders = Schema.decodeUnknownEffect(options.headers ?? HeaderText)
  // A predicate that throws decides nothing: the error stays what it is, retryable.
  const isFatal = (error: E) => {
    if (error instanceof Fatal) return true
    try {
      return options.fatal?.(error) ?? false
    } catch {
      return false
    }
  }

  const decode = (record: KafkaClient.ConsumedRecord) =>
    Effect.gen(function* () {
      if (record.value === null) return yield* Effect.fail(decodeFailure("NullValue", "the record has no value"))
      let text: string
      try {
        text = utf8.decode(record.value)
      } catch {
        return yield* Effect.fail(decodeFailure("InvalidUtf8", "the value is not valid UTF-8"))
      }
      let json: unknown
      try {
        json = JSON.parse(text)
      } catch (error) {
        return yield* Effect.fail(decodeFailure("InvalidJson", describe(error).message))
      }
      const value = yield* decodeValue(json).pipe(
        Effect.mapError((error) => decodeFailure("SchemaViolation", error.message))
      )
      const texts: Record<string, string> = {}
      for (const [name, bytes] of Object.entries(RetryPolicy.originalHeaders(record))) {
        texts[name] = lenient.decode(bytes)
      }
      const headers = yield* decodeHeaders(texts).pipe(
        Effect.mapError((error) => decodeFailure("InvalidHeaders", error.message))
      )
      return { value, headers }
    })

  return {
    topic: options.topic,
    process: (record, attempt) =>
      Effect.flatMap(decode(record), ({ value, headers }) =>
        options
          .handle({
            value,
            headers,
            attempt,
            key: record.key === null ? null : lenient.decode(record.key),
            record
          })
          .pipe(Effect.mapError((error): Failure => ({ ...describe(error), fatal: isFatal(error) })))
      ).pipe(
        // A defect is a bug or an unexpected throw — in the handler's effect, in `handle` itself before it returns
        // one, or in a Schema transformation while decoding: logged, and treated as a retryable failure, so it
        // climbs the retry ladder to the DLQ instead of being tried in place for ever.
        Effect.catchDefect((defect) =>
          Effect.fail<Failure>({ tag: "Defect", message: prettyCause(Cause.die(defect)), fatal: false })
        )
      )
  }
}

// ---------------------------------------------------------------------------------------------------------------
// The service
// ---------------------------------------------------------------------------------------------------------------

export interface ProcessorOptions {
  /** the main topics' consumer; retry topics are consumed by groups `${groupId}-retry-N` with the same settings */
  readonly consumer: Omit<KafkaConsumer.ConsumerOptions, "topics" | "dueAt">
  readonly retryTopicPrefix: string
  readonly retryMax: number
  /** the delay of each retry topic; default `RetryPolicy.defaultDelays` */
  readonly retryDelays?: ReadonlyArray<Duration.Duration> | undefined
  readonly dlqTopic: string
  /** how a retryable failure is tried again in place before it climbs the ladder. Default: twice, from 100 ms */
  readonly inPlaceRetry?: Schedule.Schedule<unknown, Failure> | undefined
  /** create missing topics at start-up (else fail naming them). Default false */
  readonly createTopics?: boolean | undefined
  /** partitions of a main topic created at start-up. Default 6 */
  readonly topicPartitions?: number | undefined
}

/** What the processor did since it started. */
export interface Stats {
  /** records handled successfully (after in-place retries or retry topics too) */
  readonly done: number
  /** in-place retries made */
  readonly retriedInPlace: number
  /** records sent to a retry topic, by topic */
  readonly retried: Readonly<Record<string, number>>
  /** records sent to the dead-letter topic, by error tag */
  readonly deadLettered: Readonly<Record<string, number>>
  /** retry records of another consumer group (the retry topics are shared), left alone */
  readonly skipped: number
}

export class Processor extends Context.Service<
  Processor,
  {
    readonly policy: RetryPolicy.RetryPolicy
    /** Processes the handlers' topics and the retry topics until interrupted (then shuts down gracefully). */
    readonly run: <R>(
      handlers: ReadonlyArray<TopicHandler<R>>
    ) => Effect.Effect<never, KafkaClient.KafkaError | TopicsMissing, R>
    readonly stats: Effect.Effect<Stats>
    /**
     * Checks that the handlers' topics, the retry topics and the dead-letter topic exist, and creates the missing
     * ones when `createTopics` allows it (else fails with `TopicsMissing`). `run` does it too; call it first to
     * produce to fresh topics before `run` has started.
     */
    readonly ensureTopics: <R>(
      handlers: ReadonlyArray<TopicHandler<R>>
    ) => Effect.Effect<void, KafkaClient.KafkaError | TopicsMissing>
  }
>()("kafka-effect/Processor") {}

/** The span a record's `traceparent` header names, as the parent of its processing span. */
const parentOf = (record: KafkaClient.ConsumedRecord): { parent?: Tracer.ExternalSpan } => {
  const header = record.headers[KafkaProducer.traceparentHeader]
  if (header === undefined) return {}
  const parent = HttpTraceContext.w3c(Headers.fromInput({ traceparent: lenient.decode(header) }))
  return Option.isSome(parent) ? { parent: parent.value } : {}
}

/** The attribute of a record's `kafka.process` span saying what came of it: done, retried, dead_lettered, skipped. */
export const outcomeAttribute = "kafka_effect.outcome"

const tooLarge = (error: KafkaProducer.ProduceError) =>
  error._tag === "KafkaError" &&
  error.reason._tag === "BrokerError" &&
  (error.reason.type === "MESSAGE_TOO_LARGE" || error.reason.type === "RECORD_LIST_TOO_LARGE")

export const make = Effect.fnUntraced(function* (options: ProcessorOptions) {
  const client = yield* KafkaClient.KafkaClient
  const producer = yield* KafkaProducer.KafkaProducer
  const policy = RetryPolicy.make({
    retryTopicPrefix: options.retryTopicPrefix,
    retryMax: options.retryMax,
    dlqTopic: options.dlqTopic,
    delays: options.retryDelays
  })
  const groupId = options.consumer.groupId
  const inPlaceRetry =
    options.inPlaceRetry ??
    Schedule.max([Schedule.exponential(Duration.millis(100), 2).pipe(Schedule.jittered), Schedule.recurs(2)])
  // A retry or dead-letter produce that fails even after the producer's own retries is tried again, slower,
  // until it succeeds: the record is not finished (nor committed) before, so waiting is what keeps it.
  const routeRetry = Schedule.exponential(Duration.seconds(1), 2).pipe(
    Schedule.modifyDelay(({ duration }) => Effect.succeed(Duration.min(duration, Duration.seconds(30))))
  )

  // A retry or dead-letter send that keeps failing (the topic deleted, not authorised) holds its record, and behind
  // it its key and its partition's commits: the member stalls. Readiness says so while any such send fails.
  const routingService = `retry and dead-letter sends of ${groupId}`
  let routesFailing = 0
  const routeFailing = (failing: boolean) =>
    Effect.suspend(() => {
      routesFailing += failing ? 1 : -1
      return routesFailing === (failing ? 1 : 0) ? Observability.report(routingService, !failing) : Effect.void
    })

  const processed = Metrics.tagged(Metrics.recordsProcessed)
  const produceFailed = Metrics.tagged(Metrics.recordsProduceFailed)
  const valuesDropped = Metrics.tagged(Metrics.deadLetterValuesDropped)
  const handlerDuration = Metrics.tagged(Metrics.handlerDuration)
  const counts: { -readonly [K in keyof Stats]: Stats[K] extends number ? number : Record<string, number> } = {
    done: 0,
    retriedInPlace: 0,
    retried: {},
    deadLettered: {},
    skipped: 0
  }
  const stats = Effect.sync(
    (): Stats => ({ ...counts, retried: { ...counts.retried }, deadLettered: { ...counts.deadLettered } })
  )

  /**
   * Checks that every topic exists; creates the missing ones when allowed, else fails naming them. Succeeds with
   * the retry topics beyond the ladder (`prefix-N`, N above retryMax) that exist: left by a larger
   * `KAFKA_CONSUMER_RETRY_MAX`, their records would otherwise wait there for ever.
   */
  const ensureTopics = (mainTopics: ReadonlyArray<string>) =>
    Effect.gen(function* () {
      const listed = yield* client.admin.listTopics
      const existing = new Set(listed)
      const beyond = listed
        .map((topic) => ({ topic, number: RetryPolicy.retryNumberOf(policy, topic) }))
        .filter(({ number }) => number !== undefined && number > policy.retryMax)
        .sort((a, b) => (a.number ?? 0) - (b.number ?? 0)) as Array<{ topic: string; number: number }>
      const missingMain = mainTopics.filter((topic) => !existing.has(topic))
      const missingOther = [...RetryPolicy.retryTopics(policy), policy.dlqTopic].filter((topic) => !existing.has(topic))
      if (options.createTopics !== true) {
        if (missingMain.length + missingOther.length === 0) return beyond
        return yield* new TopicsMissing({ topics: [...missingMain, ...missingOther] })
      }
      // Asked for even when they all exist: createTopics waits until each has its partitions' leaders, and another
      // replica may have created them a moment ago.
      const created = [
        ...(yield* client.admin.createTopics(
          mainTopics.map((topic) => ({ topic, partitions: options.topicPartitions ?? 6 }))
        ))
      ]
      // Retry and dead-letter topics get as many partitions as the largest main topic, so they keep its spread.
      const counts = yield* Effect.forEach(mainTopics, client.admin.partitionCount)
      const partitions = Math.max(1, ...counts)
      const others = [...RetryPolicy.retryTopics(policy), policy.dlqTopic]
      created.push(...(yield* client.admin.createTopics(others.map((topic) => ({ topic, partitions })))))
      if (created.length > 0) yield* Effect.logInfo(`created topics ${created.join(", ")}`)
      return beyond
    })

  /**
   * `ensureTopics`, a retriable failure tried again: a broker that cannot answer yet for a topic another replica has
   * just created is not a reason to stop, no more than a reconnect is.
   */
  const prepareTopics = (mainTopics: ReadonlyArray<string>) =>
    ensureTopics(mainTopics).pipe(
      Effect.tapError((error) =>
        error._tag === "KafkaError" && error.retriable
          ? Effect.logWarning(`checking the topics failed: ${error.message}; trying again`)
          : Effect.void
      ),
      Effect.retry({ schedule: routeRetry, while: (error) => error._tag === "KafkaError" && error.retriable })
    )

  /** Sends the record to its next hop and waits for the ack. */
  const route = (
    record: KafkaClient.ConsumedRecord,
    history: Option.Option<RetryPolicy.History>,
    topic: string,
    failure: Failure
  ) =>
    Effect.gen(function* () {
      const now = yield* Clock.currentTimeMillis
      const hop = RetryPolicy.nextHop(policy, record, failure, { now, consumerGroup: groupId, history })
      let next = hop
      let failed = false
      let attempts = 0
      // Not counted as a failed send by the producer: a hop refused as too large is stored again, without its
      // value; any other failure of it is counted below.
      const attempt = Effect.suspend(() => {
        next = hop
        return producer.send(hop, { countFailure: false })
      })
      yield* attempt.pipe(
        // Too large once the headers are added: dead-letter it without its value rather than stall the partition.
        Effect.catchIf(tooLarge, () =>
          Effect.suspend(() => {
            next = RetryPolicy.withoutValue(policy, hop)
            return producer.send(next).pipe(Effect.tap(() => Metric.update(valuesDropped({ topic: next.topic }), 1)))
          })
        ),
        Effect.tapError((error) =>
          next === hop && !tooLarge(error) ? Metric.update(produceFailed({ topic: hop.topic }), 1) : Effect.void
        ),
        // A warning while it may be passing (a leader moving); an error once it has failed for about half a minute
        // (five tries): its partition waits behind it, and readiness is down, until someone looks.
        Effect.tapError((error) =>
          Effect.logWithLevel(++attempts >= 5 ? "Error" : "Warn")(
            `could not send the record to ${next.topic} (try ${attempts}), will try again: ${error.message}`
          ).pipe(
            Effect.andThen(
              Effect.suspend(() => {
                if (failed) return Effect.void
                failed = true
                return routeFailing(true)
              })
            )
          )
        ),
        Effect.retry({ schedule: routeRetry, while: (error) => error._tag !== "ProducerClosed" }),
        // Only a closed producer gets here (shutdown): the record is not finished and will be delivered again.
        Effect.orDie,
        Effect.ensuring(Effect.suspend(() => (failed ? routeFailing(false) : Effect.void)))
      )
      const deadLettered = next.topic === policy.dlqTopic
      if (deadLettered) increment(counts.deadLettered, failure.tag)
      else increment(counts.retried, next.topic)
      yield* Metric.update(processed({ topic, outcome: deadLettered ? "dead_lettered" : "retried" }), 1)
      // The record's span ends without an error (its failure was handled): it says what happened instead.
      yield* Effect.annotateCurrentSpan({
        [outcomeAttribute]: deadLettered ? "dead_lettered" : "retried",
        "error.type": failure.tag
      })
      const log = deadLettered
        ? Effect.logError(`dead-lettered: ${failure.tag}: ${failure.message}`)
        : Effect.logWarning(`sent to ${next.topic}: ${failure.tag}: ${failure.message}`)
      yield* log.pipe(
        Effect.annotateLogs({ ...coordinates(record), attempt: next.headers?.[RetryPolicy.headers.attempt] })
      )
    })

  const run = <R>(handlers: ReadonlyArray<TopicHandler<R>>) =>
    Effect.gen(function* () {
      const byTopic = new Map(handlers.map((topicHandler) => [topicHandler.topic, topicHandler]))
      const mainTopics = [...byTopic.keys()]
      const ladder = RetryPolicy.retryTopics(policy).map((topic, index) => ({ topic, number: index + 1 }))
      const retryGroup = (number: number) => `${groupId}-retry-${number}`
      yield* Observability.report(routingService, true)
      // Every outcome of every topic from 0, so that the first dead letter of a process's life is an increase that
      // `increase()` and alerts see, not a series born at 1.
      for (const topic of byTopic.keys()) {
        for (const outcome of ["done", "retried", "dead_lettered"])
          yield* Metric.update(processed({ topic, outcome }), 0)
      }
      // Not ready until every consumer joined its group (each reports itself ready then).
      for (const group of [groupId, ...ladder.map(({ number }) => retryGroup(number))]) {
        yield* Observability.report(`consumer ${group}`, false)
      }
      const beyond = yield* prepareTopics(mainTopics)
      for (const { number } of beyond) yield* Observability.report(`consumer ${retryGroup(number)}`, false)
      if (beyond.length > 0) {
        yield* Effect.logWarning(
          `retry topics ${beyond.map(({ topic }) => topic).join(", ")} are beyond KAFKA_CONSUMER_RETRY_MAX (${policy.retryMax}): their records are handled when due, then dead-lettered if they fail again`
        )
      }
      const retries = [...ladder, ...beyond]
      const retryTopics = new Set(retries.map(({ topic }) => topic))
      const retryNumber = new Map(retries.map(({ topic, number }) => [topic, number]))

      const handle = (record: KafkaClient.ConsumedRecord): Effect.Effect<void, never, R> =>
        Effect.gen(function* () {
          // Only a retry record carries a history: a main-topic record is on its first attempt.
          const fromRetryTopic = retryTopics.has(record.topic)
          // The attempt is the retry topic's number (retry-k holds attempt k), whatever the header says: a garbled
          // or hostile attempt would otherwise send the record to a retry topic that does not exist, or back down
          // the ladder.
          const history = fromRetryTopic
            ? Option.map(RetryPolicy.historyOf(record), (h) => ({
                ...h,
                attempt: retryNumber.get(record.topic) ?? h.attempt
              }))
            : Option.none()
          // Left alone only when it names another group, even if the rest of its history is unreadable (that group
          // deals with it); a record without the header is ours (skipping it would lose it).
          if (fromRetryTopic && !RetryPolicy.isOfGroup(RetryPolicy.consumerGroupOf(record), groupId)) {
            counts.skipped++
            yield* Metric.update(processed({ topic: record.topic, outcome: "skipped" }), 1)
            yield* Effect.annotateCurrentSpan(outcomeAttribute, "skipped")
            return
          }
          const attempt = Option.match(history, { onNone: () => 0, onSome: (h) => h.attempt })
          const topic = fromRetryTopic && Option.isSome(history) ? history.value.originalTopic : record.topic
          const topicHandler = byTopic.get(topic)
          // The metrics' topic: a handler's, else the record's own (a header names no new label value).
          const label = topicHandler === undefined ? record.topic : topic
          const processing: Effect.Effect<void, Failure, R> =
            topicHandler === undefined
              ? Effect.fail({ tag: "NoHandler", message: `no handler for topic ${topic}`, fatal: true })
              : topicHandler.process(record, attempt).pipe(
                  Effect.tapError((failure) =>
                    failure.fatal
                      ? Effect.void
                      : Effect.sync(() => {
                          counts.retriedInPlace++
                        })
                  ),
                  Effect.retry({ schedule: inPlaceRetry, while: (failure) => !failure.fatal })
                )
          const [duration, exit] = yield* Effect.timed(Effect.exit(processing))
          yield* Metric.update(handlerDuration({ topic: label }), Duration.toSeconds(duration))
          if (Exit.isSuccess(exit)) {
            counts.done++
            yield* Metric.update(processed({ topic: label, outcome: "done" }), 1)
            yield* Effect.annotateCurrentSpan(outcomeAttribute, "done")
            return
          }
          // The last failure was counted as if a retry would follow: it does not.
          const failure = Cause.findErrorOption(exit.cause)
          // No failure in the cause: it is interrupts only (defects became failures in `handler`), so E is never.
          if (Option.isNone(failure)) return yield* Effect.failCause(exit.cause as Cause.Cause<never>)
          if (!failure.value.fatal) counts.retriedInPlace--
          yield* route(record, history, label, failure.value)
        }).pipe(
          Effect.annotateLogs(coordinates(record)),
          // A span per record, continuing the producer's trace when the record carries one (W3C traceparent).
          Effect.withSpan(`kafka.process ${record.topic}`, {
            kind: "consumer",
            attributes: {
              "messaging.system": "kafka",
              "messaging.destination.name": record.topic,
              "messaging.kafka.destination.partition": record.partition,
              "messaging.kafka.message.offset": record.offset.toString()
            },
            ...parentOf(record)
          })
        )

      const consumerOf = (topics: ReadonlyArray<string>, overrides: Partial<KafkaConsumer.ConsumerOptions>) =>
        KafkaConsumer.make({ ...options.consumer, topics, ...overrides })
      const consumers = [
        yield* consumerOf(mainTopics, {}),
        ...(yield* Effect.forEach(retries, ({ topic, number }) =>
          consumerOf([topic], {
            groupId: retryGroup(number),
            // A new retry group must not skip what waits in its topic.
            fromBeginning: true,
            // A retry record is due at its time: fetch it as soon as it is there, not once a kilobyte gathered.
            fetchMinBytes: 1,
            dueAt: RetryPolicy.dueAtOn(policy, number)
          })
        ))
      ]
      yield* Effect.logInfo(
        `processing ${mainTopics.join(", ")} as ${groupId}; retry topics ${retries.map(({ topic }) => topic).join(", ") || "none"}; dead letters to ${policy.dlqTopic}`
      )
      return yield* Effect.forEach(consumers, (consumer) => consumer.run(handle), {
        concurrency: "unbounded",
        discard: true
      }).pipe(Effect.andThen(Effect.never))
    }).pipe(Effect.provide(Layer.succeed(KafkaClient.KafkaClient, client)))

  return Processor.of({
    policy,
    run,
    stats,
    ensureTopics: (handlers) => Effect.asVoid(prepareTopics(handlers.map((topicHandler) => topicHandler.topic)))
  })
})

/** Processes with the Processor in context until interrupted. */
export const run = <R>(
  handlers: ReadonlyArray<TopicHandler<R>>
): Effect.Effect<never, KafkaClient.KafkaError | TopicsMissing, R | Processor> =>
  Effect.gen(function* () {
    const processor = yield* Processor
    return yield* processor.run(handlers)
  })

/**
 * Makes sure the topics of `handlers`, the retry topics and the dead-letter topic exist, with the Processor in
 * context (see `Processor.ensureTopics`).
 *
 * @example
 * ```ts
 * yield* Processor.ensureTopics(handlers)   // then producing to them cannot fail with UnknownTopic
 * ```
 */
export const ensureTopics = <R>(
  handlers: ReadonlyArray<TopicHandler<R>>
): Effect.Effect<void, KafkaClient.KafkaError | TopicsMissing, Processor> =>
  Effect.gen(function* () {
    const processor = yield* Processor
    return yield* processor.ensureTopics(handlers)
  })

/** Options from the environment's consumer settings (`KafkaConfig.consumer`). */
export const optionsFrom = (config: KafkaConfig.ConsumerConfig): ProcessorOptions => ({
  consumer: KafkaConsumer.optionsFrom(config),
  retryTopicPrefix: config.retryTopicPrefix,
  retryMax: config.retryMax,
  retryDelays: config.retryDelays,
  dlqTopic: config.dlqTopic,
  createTopics: config.createTopics,
  topicPartitions: config.topicPartitions
})

export const layer = (
  options: ProcessorOptions
): Layer.Layer<Processor, never, KafkaClient.KafkaClient | KafkaProducer.KafkaProducer> =>
  Layer.effect(Processor, make(options))

export const layerConfig: Layer.Layer<
  Processor,
  KafkaConfig.KafkaConfigError,
  KafkaClient.KafkaClient | KafkaProducer.KafkaProducer
> = Layer.effect(
  Processor,
  Effect.flatMap(KafkaConfig.consumer, (config) => make(optionsFrom(config)))
)
