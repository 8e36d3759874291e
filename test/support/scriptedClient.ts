/**
 * A KafkaClient for unit tests of the services above the port: every produce request is recorded, and its
 * outcome is scripted (succeed, or fail with a given reason). It is not a broker; contract behaviour is tested
 * against the real one and, later, the in-memory one.
 */
import { type Duration, Effect, Ref } from "effect"
import * as KafkaClient from "../../src/KafkaClient.ts"

export interface Recorded {
  /** every produce request, in order, with its records */
  readonly requests: ReadonlyArray<ReadonlyArray<KafkaClient.ProducerRecord>>
  /** "connect", "request", "disconnect" in the order they happened */
  readonly events: ReadonlyArray<string>
}

export type Outcome = "ok" | KafkaClient.KafkaErrorReason

/**
 * `partitions`: every topic's partition count (default 1, so that every record goes to partition 0), or a function
 * giving each topic's, read each time the producer asks (0: the topic does not exist). `latency`: how long each
 * request takes to be answered.
 */
export const makeWith = (
  options: {
    readonly partitions?: number | ((topic: string) => number)
    /** how long each request takes to be answered (TestClock time) */
    readonly latency?: Duration.Input
  } = {}
) =>
  Effect.gen(function* () {
    const recorded = yield* Ref.make<Recorded>({ requests: [], events: [] })
    /** outcomes of the next requests, in order; "ok" once exhausted */
    const script = yield* Ref.make<ReadonlyArray<Outcome>>([])
    const offsets = new Map<string, bigint>()

    const note = (event: string, request?: ReadonlyArray<KafkaClient.ProducerRecord>) =>
      Ref.update(recorded, (r) => ({
        requests: request === undefined ? r.requests : [...r.requests, request],
        events: [...r.events, event]
      }))

    const send = (records: ReadonlyArray<KafkaClient.ProducerRecord>) =>
      Effect.gen(function* () {
        yield* note("request", records)
        if (options.latency !== undefined) yield* Effect.sleep(options.latency)
        const outcomes = yield* Ref.getAndUpdate(script, (rest) => rest.slice(1))
        const outcome = outcomes[0] ?? "ok"
        if (outcome !== "ok") {
          return yield* new KafkaClient.KafkaError({ operation: "produce", topic: records[0]?.topic, reason: outcome })
        }
        return records.map((record) => {
          const partition = record.partition ?? 0
          const slot = `${record.topic}/${partition}`
          const offset = offsets.get(slot) ?? 0n
          offsets.set(slot, offset + 1n)
          return { topic: record.topic, partition, offset }
        })
      })

    const unsupported = (operation: string) =>
      Effect.fail(
        new KafkaClient.KafkaError({
          operation,
          reason: new KafkaClient.ClientFailed({ retriable: false, detail: "not scripted" })
        })
      )

    const client = KafkaClient.KafkaClient.of({
      brokers: ["scripted:9092"],
      admin: {
        createTopics: () => unsupported("create topics"),
        deleteTopics: () => unsupported("delete topics"),
        listTopics: unsupported("list topics"),
        partitionCount: (topic) =>
          Effect.sync(() =>
            typeof options.partitions === "function" ? options.partitions(topic) : (options.partitions ?? 1)
          ),
        fetchTopicOffsets: () => unsupported("fetch topic offsets"),
        fetchCommittedOffsets: () => unsupported("fetch committed offsets")
      },
      producer: () => Effect.acquireRelease(Effect.as(note("connect"), { send }), () => note("disconnect")),
      consumer: () => unsupported("consumer")
    })
    return {
      client,
      recorded: Ref.get(recorded),
      script: (outcomes: ReadonlyArray<Outcome>) => Ref.set(script, outcomes)
    }
  })

export const make = makeWith()

export type Scripted = Effect.Success<typeof make>
