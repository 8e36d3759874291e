import { assert, describe, it } from "@effect/vitest"
import { Duration, Effect, Exit, Fiber, Layer, Metric, Option, Scope } from "effect"
import * as Scheduler from "effect/Scheduler"
import { TestClock } from "effect/testing"
import * as InMemoryKafka from "../src/InMemoryKafka.ts"
import * as KafkaClient from "../src/KafkaClient.ts"
import * as KafkaProducer from "../src/KafkaProducer.ts"
import * as Metrics from "../src/Metrics.ts"
import * as Observability from "../src/Observability.ts"
import { kafkajsPartitionFor } from "./support/partitioner.ts"
import * as Scripted from "./support/scriptedClient.ts"

const options: KafkaProducer.ProducerOptions = {
  topic: "events",
  acks: -1,
  idempotent: true,
  retries: 3,
  linger: Duration.millis(50),
  batchSize: 3,
  queueCapacity: 100
}

/** A producer over a scripted client (topics of `partitions` partitions), in a scope the test can close. */
const setup = (
  overrides: Partial<KafkaProducer.ProducerOptions> = {},
  partitions: number | ((topic: string) => number) = 1,
  latency?: Duration.Input
) =>
  Effect.gen(function* () {
    const scripted = yield* Scripted.makeWith({ partitions, ...(latency !== undefined && { latency }) })
    const scope = yield* Scope.make()
    const producer = yield* KafkaProducer.make({ ...options, ...overrides }).pipe(
      Effect.provideService(KafkaClient.KafkaClient, scripted.client),
      Scope.provide(scope)
    )
    return { scripted, scope, producer }
  })

/** The scripted client, its topic metadata reads taking `delay(topic)` (TestClock time). */
const slowRoutes = (scripted: Scripted.Scripted, delay: (topic: string) => Duration.Input) =>
  KafkaClient.KafkaClient.of({
    ...scripted.client,
    admin: {
      ...scripted.client.admin,
      partitionCount: (topic) => Effect.delay(scripted.client.admin.partitionCount(topic), delay(topic))
    }
  })

const retriable = new KafkaClient.BrokerError({ type: "NOT_LEADER_OR_FOLLOWER", retriable: true, detail: "moved" })
const fatal = new KafkaClient.BrokerError({ type: "MESSAGE_TOO_LARGE", retriable: false, detail: "too large" })

describe("Producer", () => {
  it.effect("a lone record leaves after the linger time, not before", () =>
    Effect.gen(function* () {
      const { scripted, producer } = yield* setup()
      const fiber = yield* Effect.forkChild(producer.send({ key: "k", value: "v" }))
      yield* TestClock.adjust("49 millis")
      assert.strictEqual((yield* scripted.recorded).requests.length, 0, "still lingering at 49 ms")
      yield* TestClock.adjust("1 millis")
      const metadata = yield* Fiber.join(fiber)
      assert.deepStrictEqual(metadata, { topic: "events", partition: 0, offset: 0n })
      assert.strictEqual((yield* scripted.recorded).requests.length, 1)
    })
  )

  it.effect("a full batch leaves at once, without waiting for the linger time", () =>
    Effect.gen(function* () {
      const { scripted, producer } = yield* setup({ linger: Duration.hours(1) })
      const metadata = yield* producer.sendAll([{ value: "a" }, { value: "b" }, { value: "c" }])
      assert.deepStrictEqual(
        metadata.map((m) => m.offset),
        [0n, 1n, 2n]
      )
      const { requests } = yield* scripted.recorded
      assert.strictEqual(requests.length, 1, "one request for the batch")
      assert.deepStrictEqual(
        requests[0]?.map((r) => r.value),
        ["a", "b", "c"]
      )
    })
  )

  it.effect("records beyond the batch size go in the next request, each caller gets its own metadata", () =>
    Effect.gen(function* () {
      const { scripted, producer } = yield* setup()
      const fiber = yield* Effect.forkChild(producer.sendAll(["a", "b", "c", "d", "e"].map((value) => ({ value }))))
      yield* TestClock.adjust("50 millis")
      const metadata = yield* Fiber.join(fiber)
      assert.deepStrictEqual(
        metadata.map((m) => m.offset),
        [0n, 1n, 2n, 3n, 4n]
      )
      const { requests } = yield* scripted.recorded
      assert.deepStrictEqual(
        requests.map((request) => request.map((r) => r.value)),
        [
          ["a", "b", "c"],
          ["d", "e"]
        ]
      )
    })
  )

  it.effect("a request stays within maxBatchBytes; a record larger than that goes alone", () =>
    Effect.gen(function* () {
      const { scripted, producer } = yield* setup({ batchSize: 10, maxBatchBytes: 1_000 })
      const sizes = [400, 400, 400, 1_500, 100, 100]
      const fiber = yield* Effect.forkChild(producer.sendAll(sizes.map((n) => ({ value: "x".repeat(n) }))))
      yield* TestClock.adjust("50 millis")
      const metadata = yield* Fiber.join(fiber)
      assert.deepStrictEqual(
        metadata.map((m) => m.offset),
        [0n, 1n, 2n, 3n, 4n, 5n],
        "every caller completed, in order"
      )
      const { requests } = yield* scripted.recorded
      assert.deepStrictEqual(
        requests.map((request) => request.map((r) => (r.value as string).length)),
        [[400, 400], [400], [1_500], [100, 100]]
      )
    })
  )

  it.effect("a retriable failure is retried on the schedule and then succeeds", () =>
    Effect.gen(function* () {
      const { scripted, producer } = yield* setup({ linger: Duration.zero })
      yield* scripted.script([retriable, retriable])
      const fiber = yield* Effect.forkChild(producer.send({ value: "v" }))
      // 100 ms then 200 ms, each jittered to at most 120 %.
      yield* TestClock.adjust("120 millis")
      yield* TestClock.adjust("240 millis")
      const metadata = yield* Fiber.join(fiber)
      assert.strictEqual(metadata.offset, 0n)
      assert.strictEqual((yield* scripted.recorded).requests.length, 3)
    })
  )

  it.effect("retries stop after KAFKA_PRODUCER_RETRIES and the caller gets the typed error", () =>
    Effect.gen(function* () {
      const { scripted, producer } = yield* setup({ linger: Duration.zero, retries: 2 })
      yield* scripted.script([retriable, retriable, retriable, retriable])
      const fiber = yield* Effect.forkChild(Effect.flip(producer.send({ value: "v" })))
      yield* TestClock.adjust("10 seconds")
      const error = yield* Fiber.join(fiber)
      assert.strictEqual(error._tag, "KafkaError")
      if (error._tag === "KafkaError") assert.strictEqual(error.reason._tag, "BrokerError")
      assert.strictEqual((yield* scripted.recorded).requests.length, 3, "one try and two retries")
    })
  )

  it.effect("a non-retriable failure is not retried", () =>
    Effect.gen(function* () {
      const { scripted, producer } = yield* setup({ linger: Duration.zero })
      yield* scripted.script([fatal])
      const error = yield* Effect.flip(producer.send({ value: "v" }))
      assert.strictEqual(error._tag, "KafkaError")
      assert.isFalse(error._tag === "KafkaError" && error.retriable)
      assert.strictEqual((yield* scripted.recorded).requests.length, 1)
    })
  )

  it.effect("the linger counts from the oldest waiting record: one that waited out a slow request leaves at once", () =>
    Effect.gen(function* () {
      const { scripted, producer } = yield* setup()
      yield* scripted.script([retriable])
      const first = yield* Effect.forkChild(producer.send({ value: "a" }))
      // "a" lingers until 50 ms, fails, and is retried 80–120 ms later; "b" queues meanwhile, at 60 ms.
      yield* TestClock.adjust("60 millis")
      const second = yield* Effect.forkChild(producer.send({ value: "b" }))
      yield* TestClock.adjust("110 millis")
      yield* Fiber.join(first)
      const metadata = yield* Fiber.join(second)
      assert.strictEqual(metadata.offset, 1n, "b went without a further linger")
      assert.deepStrictEqual(
        (yield* scripted.recorded).requests.map((request) => request.map((r) => r.value)),
        [["a"], ["a"], ["b"]]
      )
    })
  )

  it.effect(
    "with several lanes, keyed records go to kafkajs' partition for the key, each partition in send order",
    () =>
      Effect.gen(function* () {
        const { scripted, producer } = yield* setup({ lanes: 3, linger: Duration.zero, batchSize: 4 }, 6)
        const keys = Array.from({ length: 60 }, (_, i) => `key-${i % 17}`)
        const metadata = yield* producer.sendAll(keys.map((key, i) => ({ key, value: String(i) })))
        const partitionFor = kafkajsPartitionFor("events", 6)
        const lastOffset = new Map<number, bigint>()
        for (const [i, m] of metadata.entries()) {
          assert.strictEqual(m.partition, partitionFor(keys[i] as string), `record ${i} on its key's partition`)
          assert.isTrue(m.offset > (lastOffset.get(m.partition) ?? -1n), `record ${i} after the earlier ones`)
          lastOffset.set(m.partition, m.offset)
        }
        const { requests, events } = yield* scripted.recorded
        assert.strictEqual(events.filter((e) => e === "connect").length, 3, "a connection per lane")
        for (const request of requests) {
          const lanesOfRequest = new Set(request.map((r) => (r.partition ?? -1) % 3))
          assert.strictEqual(lanesOfRequest.size, 1, "a request holds one lane's partitions")
        }
      })
  )

  it.effect("with several lanes, null keys spread round-robin and explicit partitions are kept", () =>
    Effect.gen(function* () {
      const { producer } = yield* setup({ lanes: 2, linger: Duration.zero }, 4)
      const spread = yield* producer.sendAll(Array.from({ length: 8 }, (_, i) => ({ value: String(i) })))
      const partitions = spread.map((m) => m.partition)
      for (let i = 1; i < partitions.length; i++) {
        assert.strictEqual(partitions[i], ((partitions[i - 1] as number) + 1) % 4, "the next partition each time")
      }
      const pinned = yield* producer.send({ key: "k", partition: 3, value: "x" })
      assert.strictEqual(pinned.partition, 3)
    })
  )

  it.effect("a record for a partition that does not exist fails alone; the others of its batch are sent once", () =>
    Effect.gen(function* () {
      const { scripted, producer } = yield* setup({ linger: Duration.millis(50) }, 3)
      const fibers = yield* Effect.forEach([0, 7, 2, -1, 1.5], (partition, i) =>
        Effect.forkChild(Effect.flip(producer.send({ partition, value: String(i) })))
      )
      yield* TestClock.adjust("50 millis")
      const outcomes = yield* Effect.forEach(fibers, (fiber) => Effect.exit(Fiber.join(fiber)))
      const [first, missing, second, negative, fractional] = outcomes
      // flipped: an acked record is a failure here, a refused one a success
      assert.deepStrictEqual(first, Exit.fail({ topic: "events", partition: 0, offset: 0n }))
      assert.deepStrictEqual(second, Exit.fail({ topic: "events", partition: 2, offset: 0n }))
      for (const [exit, detail] of [
        [missing, "partition 7 of events does not exist (it has 3)"],
        [negative, "partition -1 is not a whole number from 0"],
        [fractional, "partition 1.5 is not a whole number from 0"]
      ] as const) {
        const error = exit !== undefined && Exit.isSuccess(exit) ? exit.value : undefined
        assert.strictEqual(error?._tag, "KafkaError", detail)
        if (error?._tag === "KafkaError") {
          assert.isFalse(error.retriable, "not retriable")
          assert.strictEqual(error.reason._tag === "BrokerError" && error.reason.detail, detail)
        }
      }
      const { requests } = yield* scripted.recorded
      assert.deepStrictEqual(
        requests.map((request) => request.map((record) => record.value)),
        [["0", "2"]],
        "one request, with the valid records only"
      )
    })
  )

  it.effect("sends made while a topic's route is read are queued in the order they were made", () =>
    Effect.gen(function* () {
      const scripted = yield* Scripted.make
      // The first metadata read is slow; a second one would answer at once, and overtake it.
      let reads = 0
      const client = slowRoutes(scripted, () => (++reads === 1 ? "30 millis" : "0 millis"))
      const producer = yield* KafkaProducer.make({ ...options, linger: Duration.zero }).pipe(
        Effect.provideService(KafkaClient.KafkaClient, client)
      )
      const first = yield* Effect.forkChild(producer.send({ key: "k", value: "first" }))
      yield* TestClock.adjust("5 millis")
      const second = yield* Effect.forkChild(producer.send({ key: "k", value: "second" }))
      yield* TestClock.adjust("30 millis")
      const offsets = [(yield* Fiber.join(first)).offset, (yield* Fiber.join(second)).offset]
      assert.deepStrictEqual(offsets, [0n, 1n], "first written first")
      assert.strictEqual(reads, 1, "one read of the topic for both")
    }).pipe(Effect.scoped)
  )

  describe("sends waiting for their topic's route (in memory, 100,000 at once)", () => {
    /** InMemoryKafka whose partition-count reads take `delay` (TestClock time) and are counted in `reads`. */
    const slowInMemory = (reads: { n: number }, delay: Duration.Input) =>
      Layer.effect(
        KafkaClient.KafkaClient,
        Effect.gen(function* () {
          const client = yield* KafkaClient.KafkaClient
          return KafkaClient.KafkaClient.of({
            ...client,
            admin: {
              ...client.admin,
              partitionCount: (topic) =>
                Effect.suspend(() => {
                  reads.n++
                  return Effect.delay(client.admin.partitionCount(topic), delay)
                })
            }
          })
        })
      ).pipe(Layer.provideMerge(InMemoryKafka.layer({ topics: [{ topic: "events", partitions: 6 }] })))

    const count = 100_000
    // Correctness at scale, not speed: about a second here, many more on a machine that is busy with other work.
    const scale = 120_000
    const record = (i: number) => ({ key: `k${i % 1_000}`, value: String(i) })

    /** Advances the clock in linger-sized steps until `fiber` ends (each step runs everything then due). */
    const runToEnd = <A, E>(fiber: Fiber.Fiber<A, E>) =>
      Effect.gen(function* () {
        while (fiber.pollUnsafe() === undefined) yield* TestClock.adjust("5 millis")
        return yield* Fiber.join(fiber)
      })

    /** Each partition's values are in send order, and every record is there once. */
    const assertStoredInOrder = Effect.gen(function* () {
      const stored = yield* InMemoryKafka.records("events")
      assert.strictEqual(stored.length, count)
      const last = new Map<number, number>()
      for (const r of stored) {
        const value = Number(Buffer.from(r.value ?? new Uint8Array()).toString())
        assert.isTrue(
          value > (last.get(r.partition) ?? -1),
          `partition ${r.partition}: ${value} after ${last.get(r.partition)}`
        )
        last.set(r.partition, value)
      }
    })

    it.effect(
      "concurrent sends: every one completes, each partition keeps send order, the route is read once",
      () => {
        const reads = { n: 0 }
        return Effect.gen(function* () {
          const producer = yield* KafkaProducer.KafkaProducer
          const all = yield* Effect.forkChild(
            Effect.forEach(
              Array.from({ length: count }, (_, i) => i),
              (i) => producer.send(record(i)),
              {
                concurrency: "unbounded"
              }
            )
          )
          const metadata = yield* runToEnd(all)
          assert.strictEqual(metadata.length, count)
          assert.strictEqual(reads.n, 1, "one route read for all of them")
          yield* assertStoredInOrder
        }).pipe(Effect.provide(KafkaProducer.layer().pipe(Layer.provideMerge(slowInMemory(reads, "200 millis")))))
      },
      scale
    )

    it.effect(
      "sendAll: every record completes in order, the route is read once",
      () => {
        const reads = { n: 0 }
        return Effect.gen(function* () {
          const producer = yield* KafkaProducer.KafkaProducer
          const all = yield* Effect.forkChild(producer.sendAll(Array.from({ length: count }, (_, i) => record(i))))
          const metadata = yield* runToEnd(all)
          assert.strictEqual(metadata.length, count)
          assert.strictEqual(reads.n, 1, "one route read")
          yield* assertStoredInOrder
        }).pipe(Effect.provide(KafkaProducer.layer().pipe(Layer.provideMerge(slowInMemory(reads, "200 millis")))))
      },
      scale
    )
  })

  it.effect("flush waits for sends still waiting for their topic's route, and they do not linger", () =>
    Effect.gen(function* () {
      const scripted = yield* Scripted.make
      const client = slowRoutes(scripted, () => "100 millis")
      const producer = yield* KafkaProducer.make({ ...options, linger: Duration.hours(1) }).pipe(
        Effect.provideService(KafkaClient.KafkaClient, client)
      )
      const sends = yield* Effect.forkChild(producer.sendAll([{ value: "a" }, { value: "b" }]))
      yield* TestClock.adjust("1 millis")
      const flushing = yield* Effect.forkChild(producer.flush)
      yield* TestClock.adjust("100 millis")
      assert.isDefined(flushing.pollUnsafe(), "flushed once the route came, not an hour later")
      assert.deepStrictEqual(
        (yield* scripted.recorded).requests.map((request) => request.map((r) => r.value)),
        [["a", "b"]]
      )
      yield* Fiber.join(sends)
    }).pipe(Effect.scoped)
  )

  it.effect(
    "closing queues and sends what waits for a route; past the flush timeout it fails it with ProducerClosed",
    () =>
      Effect.gen(function* () {
        const scripted = yield* Scripted.make
        const client = slowRoutes(scripted, (topic) => (topic === "slow" ? "1 hour" : "100 millis"))
        const scope = yield* Scope.make()
        const producer = yield* KafkaProducer.make({ ...options, flushTimeout: Duration.seconds(1) }).pipe(
          Effect.provideService(KafkaClient.KafkaClient, client),
          Scope.provide(scope)
        )
        const ok = yield* Effect.forkChild(producer.send({ value: "ok" }))
        const hung = yield* Effect.forkChild(Effect.flip(producer.send({ topic: "slow", value: "hung" })))
        yield* TestClock.adjust("1 millis")
        const closing = yield* Effect.forkChild(Scope.close(scope, Exit.void))
        yield* TestClock.adjust("100 millis")
        assert.strictEqual((yield* Fiber.join(ok)).offset, 0n, "queued and sent while closing")
        yield* TestClock.adjust("1 second")
        assert.isDefined(closing.pollUnsafe(), "closed at the flush timeout")
        assert.strictEqual((yield* Fiber.join(hung))._tag, "ProducerClosed")
      })
  )

  it.effect("a send interrupted while it waits for its topic's route is not sent", () =>
    Effect.gen(function* () {
      const scripted = yield* Scripted.make
      const client = slowRoutes(scripted, () => "100 millis")
      const producer = yield* KafkaProducer.make({ ...options, linger: Duration.zero }).pipe(
        Effect.provideService(KafkaClient.KafkaClient, client)
      )
      const first = yield* Effect.forkChild(producer.send({ value: "first" }))
      const dropped = yield* Effect.forkChild(producer.send({ value: "dropped" }))
      const last = yield* Effect.forkChild(producer.send({ value: "last" }))
      yield* TestClock.adjust("1 millis")
      yield* Fiber.interrupt(dropped)
      yield* TestClock.adjust("100 millis")
      yield* Fiber.join(first)
      yield* Fiber.join(last)
      assert.deepStrictEqual(
        (yield* scripted.recorded).requests.flatMap((request) => request.map((r) => r.value)),
        ["first", "last"]
      )
    }).pipe(Effect.scoped)
  )

  it.effect(
    "a record for a topic that does not exist fails alone, once its retries are spent; a partition added later is found",
    () =>
      Effect.gen(function* () {
        let partitions = 2
        let reads = 0
        let missingReads = 0
        const { scripted, producer } = yield* setup({ linger: Duration.zero, retries: 3 }, (topic) => {
          reads++
          if (topic === "missing") missingReads++
          return topic === "missing" ? 0 : partitions
        })
        // Asked again within the retries: a topic created a moment ago may not be in the broker's metadata yet.
        const missing = yield* Effect.forkChild(Effect.flip(producer.send({ topic: "missing", value: "lost?" })))
        yield* TestClock.adjust("1 minute")
        const unknown = yield* Fiber.join(missing)
        assert.strictEqual(unknown._tag === "KafkaError" && unknown.reason._tag, "UnknownTopic")
        assert.strictEqual(missingReads, 4, "the first read and 3 retries")
        const failed = (topic: string) =>
          Effect.map(
            Metric.value(Metric.withAttributes(Metrics.recordsProduceFailed, { topic })),
            (state) => state.count
          )
        assert.strictEqual(yield* failed("missing"), 1, "a send refused before it was queued counts as failed")
        yield* producer.send({ value: "a" })
        yield* producer.send({ value: "b", partition: 1 })
        const readsBefore = reads
        yield* producer.send({ value: "c" })
        assert.strictEqual(reads, readsBefore, "a known topic's count is not read again for each record")
        partitions = 4
        const added = yield* producer.send({ value: "d", partition: 3 })
        assert.strictEqual(added.partition, 3, "the count is read again for a partition beyond it")
        const { requests } = yield* scripted.recorded
        assert.deepStrictEqual(
          requests.flatMap((request) => request.map((record) => record.value)),
          ["a", "b", "c", "d"]
        )
        assert.strictEqual(yield* failed("events"), 0, "the topic's failed counter exists from its first send")
      }).pipe(Effect.provideService(Metric.MetricRegistry, new Map()))
  )

  it.effect("a request that fails for good is sent again record by record: each caller gets its own outcome", () =>
    Effect.gen(function* () {
      const { scripted, producer } = yield* setup()
      // The request of three fails for good (as kafkajs fails a whole answer for one partition's error); alone,
      // the second record fails again, the others are written.
      yield* scripted.script([fatal, "ok", fatal, "ok"])
      const fibers = yield* Effect.forEach(["a", "b", "c"], (value) =>
        Effect.forkChild(Effect.exit(producer.send({ value })))
      )
      yield* TestClock.adjust("50 millis")
      const exits = yield* Effect.forEach(fibers, Fiber.join)
      assert.deepStrictEqual(
        exits.map((exit) => exit._tag),
        ["Success", "Failure", "Success"]
      )
      assert.deepStrictEqual(
        (yield* scripted.recorded).requests.map((request) => request.map((record) => record.value)),
        [["a", "b", "c"], ["a"], ["b"], ["c"]]
      )
    })
  )

  it.effect("a request of several topics failing after its retries is sent again topic by topic", () =>
    Effect.gen(function* () {
      const scripted = yield* Scripted.makeWith({ partitions: 1 })
      // Every request holding a record for "unreachable" fails, retriably.
      const client = KafkaClient.KafkaClient.of({
        ...scripted.client,
        producer: (producerOptions) =>
          Effect.map(scripted.client.producer(producerOptions), (connection) => ({
            send: (records) =>
              records.some((record) => record.topic === "unreachable")
                ? Effect.fail(
                    new KafkaClient.KafkaError({ operation: "produce", topic: "unreachable", reason: retriable })
                  )
                : connection.send(records)
          }))
      })
      const producer = yield* KafkaProducer.make({ ...options, retries: 2 }).pipe(
        Effect.provideService(KafkaClient.KafkaClient, client)
      )
      const fibers = yield* Effect.forEach(["unreachable", "events", "unreachable", "events"], (topic, i) =>
        Effect.forkChild(Effect.exit(producer.send({ topic, value: String(i) })))
      )
      yield* TestClock.adjust("1 minute")
      const exits = yield* Effect.forEach(fibers, Fiber.join)
      assert.deepStrictEqual(
        exits.map((exit) => exit._tag),
        ["Failure", "Success", "Failure", "Success"],
        "the reachable topic's records are written"
      )
    }).pipe(Effect.scoped)
  )

  it.effect("an unknown topic at send time (its first record found it) is tried again", () =>
    Effect.gen(function* () {
      const { scripted, producer } = yield* setup({ linger: Duration.zero })
      yield* producer.send({ value: "first" })
      yield* scripted.script([new KafkaClient.UnknownTopic({ topic: "events" }), "ok"])
      const fiber = yield* Effect.forkChild(producer.send({ value: "second" }))
      yield* TestClock.adjust("1 second")
      assert.strictEqual((yield* Fiber.join(fiber)).offset, 1n)
    })
  )

  it.effect("a lane waiting to retry does not hold up the other lanes", () =>
    Effect.gen(function* () {
      const { scripted, producer } = yield* setup({ lanes: 2, linger: Duration.zero }, 2)
      yield* scripted.script([retriable])
      const fibers = yield* Effect.forEach([0, 1], (partition) =>
        Effect.forkChild(producer.send({ partition, value: String(partition) }))
      )
      yield* TestClock.adjust("1 millis")
      const done = fibers.filter((fiber) => fiber.pollUnsafe() !== undefined)
      assert.strictEqual(done.length, 1, "the healthy lane's record is acked while the other waits to retry")
      yield* TestClock.adjust("120 millis")
      const metadata = yield* Effect.forEach(fibers, Fiber.join)
      assert.deepStrictEqual(
        metadata.map((m) => m.partition),
        [0, 1]
      )
    })
  )

  it.effect("closing the scope flushes every lane before disconnecting", () =>
    Effect.gen(function* () {
      const { scripted, scope, producer } = yield* setup({ lanes: 2, linger: Duration.seconds(5) }, 2)
      const fibers = yield* Effect.forEach([0, 1], (partition) =>
        Effect.forkChild(producer.send({ partition, value: String(partition) }))
      )
      yield* Effect.yieldNow
      yield* Scope.close(scope, Exit.void)
      yield* Effect.forEach(fibers, Fiber.join)
      const { events } = yield* scripted.recorded
      assert.deepStrictEqual(events, ["connect", "connect", "request", "request", "disconnect", "disconnect"])
    })
  )

  it.effect("closing the scope flushes pending records before disconnecting", () =>
    Effect.gen(function* () {
      const { scripted, scope, producer } = yield* setup({ linger: Duration.seconds(5) })
      const fiber = yield* Effect.forkChild(producer.send({ value: "pending" }))
      yield* Effect.yieldNow
      yield* Scope.close(scope, Exit.void)
      const metadata = yield* Fiber.join(fiber)
      assert.strictEqual(metadata.offset, 0n)
      assert.deepStrictEqual((yield* scripted.recorded).events, ["connect", "request", "disconnect"])
    })
  )

  it.effect(
    "at the flush timeout every caller completes: those waiting for room in the queue with ProducerClosed",
    () =>
      Effect.gen(function* () {
        const { scope, producer } = yield* setup(
          { batchSize: 1, queueCapacity: 2, linger: Duration.zero, flushTimeout: Duration.millis(200) },
          1,
          "500 millis"
        )
        // One in flight, two queued, five waiting for room.
        const fibers = yield* Effect.forEach(Array.from({ length: 8 }, String), (value) =>
          Effect.forkChild(Effect.exit(producer.send({ value })))
        )
        yield* TestClock.adjust("50 millis")
        const closing = yield* Effect.forkChild(Scope.close(scope, Exit.void))
        yield* TestClock.adjust("1 second")
        assert.isDefined(closing.pollUnsafe(), "closed")
        const outcomes = fibers.map((fiber) => fiber.pollUnsafe())
        assert.isTrue(
          outcomes.every((outcome) => outcome !== undefined),
          "every caller completed"
        )
        const closed = outcomes.filter(
          (outcome) =>
            outcome !== undefined &&
            Exit.isSuccess(outcome) &&
            Exit.isFailure(outcome.value) &&
            Option.getOrUndefined(Exit.findErrorOption(outcome.value))?._tag === "ProducerClosed"
        )
        assert.strictEqual(closed.length, 8, "none acked within 200 ms: all told ProducerClosed")
      })
  )

  it.effect("closing waits no longer than the flush timeout for a batch that is being retried", () =>
    Effect.gen(function* () {
      const { scripted, scope, producer } = yield* setup(
        { linger: Duration.zero, retries: 5, flushTimeout: Duration.millis(200) },
        1,
        "300 millis"
      )
      yield* scripted.script([retriable, retriable, retriable, retriable, retriable, retriable])
      const fiber = yield* Effect.forkChild(Effect.flip(producer.send({ value: "v" })))
      yield* TestClock.adjust("10 millis")
      const closing = yield* Effect.forkChild(Scope.close(scope, Exit.void))
      yield* TestClock.adjust("250 millis")
      assert.isDefined(closing.pollUnsafe(), "closed 200 ms after, not after the retries and their back-offs")
      assert.strictEqual((yield* Fiber.join(fiber))._tag, "ProducerClosed")
    })
  )

  it.effect("readiness follows the sends: not ready, saying why, while a request goes unanswered for 30 s", () =>
    Effect.gen(function* () {
      const { producer } = yield* setup({ linger: Duration.zero }, 1, "40 seconds")
      const health = yield* Observability.Health
      const sending = yield* Effect.forkChild(producer.send({ value: "v" }))
      yield* TestClock.adjust("29 seconds")
      assert.isTrue((yield* health.status).ready, "29 s: still ready")
      yield* TestClock.adjust("3 seconds")
      const hung = yield* health.status
      assert.isFalse(hung.ready, "32 s without an answer")
      assert.match(hung.reasons.producer ?? "", /a produce request unanswered for 3\d s/)
      yield* TestClock.adjust("10 seconds")
      yield* Fiber.join(sending)
      assert.isTrue((yield* health.status).ready, "answered: ready again")
    }).pipe(Effect.provide(Observability.layerHealth))
  )

  it.effect(
    "past the flush timeout, a send whose topic's line was queueing it when closing stopped waiting is told ProducerClosed",
    () =>
      Effect.gen(function* () {
        // A hung broker: a, in flight, never answers; b fills the queue; c and d wait in the line of a new topic,
        // whose reader waits for room.
        const { scope, producer } = yield* setup(
          { batchSize: 1, queueCapacity: 1, linger: Duration.zero, retries: 0, flushTimeout: Duration.millis(300) },
          1,
          "1 hour"
        )
        const fibers = yield* Effect.forEach(
          [{ value: "a" }, { value: "b" }, { topic: "other", value: "c" }, { topic: "other", value: "d" }],
          (record) => Effect.forkChild(Effect.exit(producer.send(record)))
        )
        yield* TestClock.adjust("10 millis")
        const closing = yield* Effect.forkChild(Scope.close(scope, Exit.void))
        yield* TestClock.adjust("1 second")
        assert.isDefined(closing.pollUnsafe(), "closed")
        for (const fiber of fibers) {
          const outcome = fiber.pollUnsafe()
          assert.isDefined(outcome, "every caller completes")
          const error =
            outcome !== undefined && Exit.isSuccess(outcome) ? Exit.findErrorOption(outcome.value) : undefined
          assert.strictEqual(error !== undefined && Option.getOrUndefined(error)?._tag, "ProducerClosed")
        }
      })
  )

  it.effect("a record acked after closing gave up on it is counted once, as failed (its caller was told so)", () =>
    Effect.gen(function* () {
      const { scope, producer } = yield* setup(
        { linger: Duration.zero, retries: 0, flushTimeout: Duration.millis(200) },
        1,
        "600 millis"
      )
      const sending = yield* Effect.forkChild(Effect.exit(producer.send({ value: "a" })))
      yield* TestClock.adjust("10 millis")
      const closing = yield* Effect.forkChild(Scope.close(scope, Exit.void))
      yield* TestClock.adjust("1 second")
      yield* Fiber.join(closing)
      yield* Fiber.join(sending)
      const count = (metric: typeof Metrics.recordsProduced) =>
        Effect.map(Metric.value(Metric.withAttributes(metric, { topic: "events" })), (state) => state.count)
      assert.strictEqual(yield* count(Metrics.recordsProduceFailed), 1)
      assert.strictEqual(yield* count(Metrics.recordsProduced), 0)
    }).pipe(Effect.provideService(Metric.MetricRegistry, new Map()))
  )

  it.effect(
    "flush is not cut short by a send interrupted while it waited for room: it waits for the records before",
    () =>
      Effect.gen(function* () {
        const { producer } = yield* setup({ batchSize: 1, queueCapacity: 1, linger: Duration.zero }, 1, "500 millis")
        yield* Effect.forkChild(producer.send({ value: "warm-up" }))
        yield* TestClock.adjust("500 millis")
        const a = yield* Effect.forkChild(producer.send({ value: "a" }))
        const b = yield* Effect.forkChild(producer.send({ value: "b" }))
        const c = yield* Effect.forkChild(producer.send({ value: "c" }))
        yield* TestClock.adjust("10 millis")
        yield* Fiber.interrupt(c)
        const flushing = yield* Effect.forkChild(Effect.exit(producer.flush))
        yield* TestClock.adjust("100 millis")
        assert.isUndefined(flushing.pollUnsafe(), "still waiting for a and b")
        yield* TestClock.adjust("1 second")
        const flushed = yield* Fiber.join(flushing)
        assert.isTrue(Exit.isSuccess(flushed), "flush succeeds")
        assert.isDefined(a.pollUnsafe())
        assert.isDefined(b.pollUnsafe())
      }).pipe(Effect.scoped)
  )

  it.effect("a send interrupted at any point of joining its topic's line never leaves the line without a reader", () =>
    Effect.gen(function* () {
      const { producer } = yield* setup({ linger: Duration.zero })
      // The scheduler yields every N operations: for each N, the first send is interrupted at that yield, somewhere
      // in its way into a new topic's line; a later send to the same topic must still go through.
      for (let n = 2; n <= 80; n++) {
        const topic = `t${n}`
        const first = yield* Effect.forkChild(
          producer.send({ topic, value: "first" }).pipe(Effect.provideService(Scheduler.MaxOpsBeforeYield, n))
        )
        yield* Effect.yieldNow
        yield* Fiber.interrupt(first)
        // Hung in an orphaned line, this would never complete (and the test would time out).
        const later = yield* producer.send({ topic, value: "later" })
        assert.strictEqual(later.topic, topic, `N=${n}`)
      }
    }).pipe(Effect.scoped)
  )

  it.effect("send after the scope closed fails with ProducerClosed", () =>
    Effect.gen(function* () {
      const { scope, producer } = yield* setup()
      yield* Scope.close(scope, Exit.void)
      const error = yield* Effect.flip(producer.send({ topic: "orders", value: "late" }))
      assert.strictEqual(error._tag, "ProducerClosed")
      assert.include(error.message, "orders")
    })
  )

  it.effect("flush waits for every record sent before it", () =>
    Effect.gen(function* () {
      const { scripted, producer } = yield* setup()
      const fiber = yield* Effect.forkChild(producer.sendAll([{ value: "a" }, { value: "b" }]))
      yield* Effect.yieldNow
      const flushing = yield* Effect.forkChild(producer.flush)
      yield* TestClock.adjust("50 millis")
      yield* Fiber.join(flushing)
      assert.strictEqual((yield* scripted.recorded).requests.flat().length, 2)
      yield* Fiber.join(fiber)
    })
  )

  it.effect("flush sends what lingers at once; records sent after it linger again", () =>
    Effect.gen(function* () {
      const { scripted, producer } = yield* setup({ linger: Duration.hours(1) })
      const lingering = yield* Effect.forkChild(producer.sendAll([{ value: "a" }, { value: "b" }]))
      yield* TestClock.adjust("1 millis")
      assert.strictEqual((yield* scripted.recorded).requests.length, 0, "lingering")
      const flushing = yield* Effect.forkChild(producer.flush)
      yield* TestClock.adjust("1 millis")
      assert.deepStrictEqual(
        (yield* scripted.recorded).requests.map((request) => request.map((r) => r.value)),
        [["a", "b"]],
        "sent by the flush, an hour before the linger ends"
      )
      yield* Fiber.join(flushing)
      yield* Fiber.join(lingering)
      const later = yield* Effect.forkChild(producer.send({ value: "c" }))
      yield* TestClock.adjust("59 minutes")
      assert.strictEqual((yield* scripted.recorded).requests.length, 1, "c lingers: the flush is over")
      yield* TestClock.adjust("1 minutes")
      yield* Fiber.join(later)
      assert.strictEqual((yield* scripted.recorded).requests.length, 2)
    })
  )

  it.effect("typed topics encode values with their Schema", () =>
    Effect.gen(function* () {
      const { Schema } = yield* Effect.promise(() => import("effect"))
      const Order = Schema.Struct({ id: Schema.String, total: Schema.Number })
      const orders = KafkaProducer.typedTopic("orders", Order)
      const { scripted, producer } = yield* setup({ linger: Duration.zero })
      yield* orders
        .send({ id: "o-1", total: 12.5 }, { key: "o-1" })
        .pipe(Effect.provideService(KafkaProducer.KafkaProducer, producer))
      const [request] = (yield* scripted.recorded).requests
      assert.strictEqual(request?.[0]?.topic, "orders")
      assert.strictEqual(request?.[0]?.key, "o-1")
      assert.deepStrictEqual(JSON.parse(String(request?.[0]?.value)), { id: "o-1", total: 12.5 })
    })
  )

  it.effect("options given in code are checked as the environment's are: the layer fails, naming each", () =>
    Effect.gen(function* () {
      const scripted = yield* Scripted.make
      const error = yield* Effect.flip(
        KafkaProducer.make({ ...KafkaProducer.defaults, acks: 1, batchSize: 0 }).pipe(
          Effect.provideService(KafkaClient.KafkaClient, scripted.client),
          Effect.scoped
        )
      )
      assert.strictEqual(error._tag, "KafkaConfigError")
      if (error._tag === "KafkaConfigError") {
        assert.deepStrictEqual(
          error.problems.map((problem) => problem.variable),
          ["KafkaProducer option acks", "KafkaProducer option batchSize"]
        )
        assert.include(error.message, "-1 (all) when idempotent is true")
      }
      assert.deepStrictEqual((yield* scripted.recorded).events, [], "no connection was made")
    })
  )

  it.effect("the layer builds from a KafkaClient", () =>
    Effect.gen(function* () {
      const scripted = yield* Scripted.make
      const layer = KafkaProducer.layer({ ...options, linger: Duration.zero }).pipe(
        Layer.provide(Layer.succeed(KafkaClient.KafkaClient, scripted.client))
      )
      const metadata = yield* KafkaProducer.send({ value: "x" }).pipe(Effect.provide(layer))
      assert.strictEqual(metadata.topic, "events")
    })
  )
})
