import { assert, describe, it } from "@effect/vitest"
import { Clock, Deferred, Duration, Effect, Fiber, Layer, Metric, Schedule } from "effect"
import { TestClock } from "effect/testing"
import * as InMemoryKafka from "../src/InMemoryKafka.ts"
import * as KafkaClient from "../src/KafkaClient.ts"
import * as KafkaConsumer from "../src/KafkaConsumer.ts"
import * as Metrics from "../src/Metrics.ts"
import * as WorkerPool from "../src/WorkerPool.ts"
import { random } from "./support/random.ts"

const text = (bytes: Uint8Array | null) => (bytes === null ? "" : new TextDecoder().decode(bytes))

const options = (overrides: Partial<KafkaConsumer.ConsumerOptions> = {}): KafkaConsumer.ConsumerOptions => ({
  groupId: "g",
  topics: ["events"],
  workers: 8,
  maxInFlight: 200,
  fromBeginning: true,
  commitInterval: Duration.seconds(1),
  shutdownTimeout: Duration.seconds(5),
  ...overrides
})

const setup = (partitions: number, overrides: Partial<KafkaConsumer.ConsumerOptions> = {}) =>
  KafkaConsumer.layer(options(overrides)).pipe(
    Layer.provideMerge(InMemoryKafka.layer({ topics: [{ topic: "events", partitions }] }))
  )

/** Moves virtual time in steps until `done` holds (or `maxSteps` steps passed). */
const advanceUntil = (done: () => boolean, step: Duration.Input = "10 millis", maxSteps = 100_000) =>
  Effect.gen(function* () {
    for (let i = 0; i < maxSteps && !done(); i++) yield* TestClock.adjust(step)
  })

/** The in-memory client, each of whose consumer connections `change` alters (to script its failures). */
const withConnections =
  (change: (connection: KafkaClient.ConsumerConnection) => KafkaClient.ConsumerConnection) =>
  (inner: KafkaClient.KafkaClient["Service"]) =>
    KafkaClient.KafkaClient.of({
      ...inner,
      consumer: (consumerOptions) => Effect.map(inner.consumer(consumerOptions), change)
    })

describe("KafkaConsumer", () => {
  it.effect("per-key order holds under random handler latencies: 10,000 records, 1,000 keys", () =>
    Effect.gen(function* () {
      const records = Array.from({ length: 10_000 }, (_, i) => ({ key: `key-${i % 1000}`, value: String(i) }))
      yield* InMemoryKafka.produce("events", records)
      const next = random(42)
      const lastByKey = new Map<string, number>()
      const running = new Set<string>()
      let handled = 0
      let violations = 0
      let overlaps = 0
      const fiber = yield* Effect.forkChild(
        KafkaConsumer.run((record) =>
          Effect.gen(function* () {
            const key = text(record.key)
            if (running.has(key)) overlaps++
            running.add(key)
            const index = Number(text(record.value))
            if ((lastByKey.get(key) ?? -1) > index) violations++
            lastByKey.set(key, index)
            yield* Effect.sleep(Duration.millis(Math.floor(next() * 50)))
            running.delete(key)
            handled++
          })
        )
      )
      yield* advanceUntil(() => handled >= 10_000)
      assert.strictEqual(handled, 10_000)
      assert.strictEqual(violations, 0, "no key handled out of offset order")
      assert.strictEqual(overlaps, 0, "no key handled twice at once")
      yield* Fiber.interrupt(fiber)
    }).pipe(Effect.provide(setup(4, { workers: 16, maxInFlight: 500 })))
  )

  it.effect("in-flight records never exceed the bound; fetching waits instead", () =>
    Effect.gen(function* () {
      yield* InMemoryKafka.produce(
        "events",
        Array.from({ length: 1000 }, (_, i) => ({ key: `k${i}`, value: String(i) }))
      )
      const consumer = yield* KafkaConsumer.KafkaConsumer
      const release = yield* Deferred.make<void>()
      let started = 0
      let maxInFlight = 0
      const fiber = yield* Effect.forkChild(
        consumer.run(() =>
          Effect.gen(function* () {
            started++
            maxInFlight = Math.max(maxInFlight, yield* consumer.inFlight)
            yield* Deferred.await(release)
          })
        )
      )
      yield* advanceUntil(() => started >= 8, "1 millis", 1000)
      assert.strictEqual(yield* consumer.inFlight, 50, "the pool is exactly full")
      assert.strictEqual(started, 8, "one running handler per worker; the rest queued")
      yield* Deferred.succeed(release, undefined)
      yield* advanceUntil(() => started >= 1000, "1 millis", 10_000)
      assert.strictEqual(started, 1000)
      assert.isAtMost(maxInFlight, 50)
      yield* Fiber.interrupt(fiber)
    }).pipe(Effect.provide(setup(4, { workers: 8, maxInFlight: 50 })))
  )

  it.effect("shutdown waits for in-flight handlers up to the timeout and commits exactly what finished", () =>
    Effect.gen(function* () {
      // Ten records of ten keys on one partition; record i takes i + 1 seconds.
      yield* InMemoryKafka.produce(
        "events",
        Array.from({ length: 10 }, (_, i) => ({ key: `k${i}`, value: String(i) }))
      )
      let started = 0
      const fiber = yield* Effect.forkChild(
        KafkaConsumer.run((record) =>
          Effect.sync(() => started++).pipe(
            Effect.andThen(Effect.sleep(Duration.seconds(Number(text(record.value)) + 1)))
          )
        )
      )
      yield* advanceUntil(() => started >= 10, "1 millis", 100)
      const stopping = yield* Effect.forkChild(Fiber.interrupt(fiber))
      // The shutdown timeout is 5.5 s: records 0–4 (1–5 s) finish, 5–9 do not.
      yield* TestClock.adjust("5 seconds")
      assert.isUndefined(stopping.pollUnsafe(), "still waiting for in-flight handlers")
      yield* TestClock.adjust("600 millis")
      yield* Fiber.join(stopping)
      const broker = yield* InMemoryKafka.InMemoryBroker
      assert.strictEqual(yield* broker.committed("g", "events", 0), 5n, "committed up to the first unfinished record")
    }).pipe(Effect.provide(setup(1, { workers: 16, shutdownTimeout: Duration.millis(5500) })))
  )

  it.effect("records finished and committed hold no place: one slow record leaves the other workers busy", () =>
    Effect.gen(function* () {
      // Two workers; key "a" on one of them, `other` on the other.
      let other = "b"
      for (let i = 0; WorkerPool.shardOf(other, 2) === WorkerPool.shardOf("a", 2); i++) other = `b${i}`
      // 600 records of "a": a chunk of 512 (one job) and one of 88, whose second record hangs.
      yield* InMemoryKafka.produce(
        "events",
        Array.from({ length: 600 }, (_, i) => ({ key: "a", value: String(i), partition: 0 }))
      )
      let handledOther = 0
      const fiber = yield* Effect.forkChild(
        KafkaConsumer.run((record) =>
          record.partition === 0 && record.offset === 513n
            ? Effect.never
            : Effect.sync(() => {
                if (record.partition === 1) handledOther++
              })
        )
      )
      const broker = yield* InMemoryKafka.InMemoryBroker
      let committed: bigint | undefined
      for (let i = 0; i < 1_000 && committed !== 513n; i++) {
        yield* TestClock.adjust("10 millis")
        committed = yield* broker.committed("g", "events", 0)
      }
      assert.strictEqual(committed, 513n, "partition 0 committed up to the hanging record")
      // The 513 committed records gave their places back; the 600 of partition 1 fit in what is left (1,000 − 87).
      yield* InMemoryKafka.produce(
        "events",
        Array.from({ length: 600 }, (_, i) => ({ key: other, value: String(i), partition: 1 }))
      )
      yield* advanceUntil(() => handledOther === 600, "10 millis", 1_000)
      assert.strictEqual(handledOther, 600, "the idle worker handled partition 1")
      // Shutdown waits for the hanging record only its timeout.
      const stopping = yield* Effect.forkChild(Fiber.interrupt(fiber))
      yield* TestClock.adjust("600 millis")
      assert.isDefined(stopping.pollUnsafe(), "stopped within the shutdown timeout")
    }).pipe(Effect.provide(setup(2, { workers: 2, maxInFlight: 1_000, shutdownTimeout: Duration.millis(500) })))
  )

  it.effect("run fails when the member cannot start for a reason retrying cannot fix (an unknown topic)", () =>
    Effect.gen(function* () {
      const fiber = yield* Effect.forkChild(Effect.flip(KafkaConsumer.run(() => Effect.void)))
      yield* TestClock.adjust("1 minute")
      const exit = fiber.pollUnsafe()
      assert.isDefined(exit, "run ended instead of restarting for ever")
      const error = yield* Fiber.join(fiber)
      assert.strictEqual(error.reason._tag, "UnknownTopic")
    }).pipe(Effect.provide(setup(1, { topics: ["missing"] })))
  )

  it.effect("the in-flight gauge falls back to 0 when the records left unfinished at shutdown are given back", () =>
    Effect.gen(function* () {
      yield* InMemoryKafka.produce(
        "events",
        Array.from({ length: 5 }, (_, i) => ({ key: `k${i}`, value: String(i) }))
      )
      let started = 0
      const fiber = yield* Effect.forkChild(
        KafkaConsumer.run((record) =>
          Effect.sync(() => started++).pipe(Effect.andThen(record.offset === 0n ? Effect.never : Effect.void))
        )
      )
      const gauge = Metric.withAttributes(Metrics.recordsInFlight, { group: "g" })
      yield* advanceUntil(() => started >= 5, "10 millis", 1_000)
      yield* TestClock.adjust("2 seconds")
      assert.strictEqual(yield* Metric.value(gauge).pipe(Effect.map((state) => state.value)), 5, "five uncommitted")
      const stopping = yield* Effect.forkChild(Fiber.interrupt(fiber))
      yield* TestClock.adjust("1 second")
      yield* Fiber.join(stopping)
      assert.strictEqual(yield* Metric.value(gauge).pipe(Effect.map((state) => state.value)), 0)
    }).pipe(Effect.provide(setup(1, { shutdownTimeout: Duration.millis(500) })))
  )

  it.effect("lag shows a partition held by a record that does not finish, and falls to 0 once it is not ours", () =>
    Effect.gen(function* () {
      yield* InMemoryKafka.produce(
        "events",
        Array.from({ length: 10 }, (_, i) => ({ key: `k${i}`, value: String(i) }))
      )
      const fiber = yield* Effect.forkChild(
        KafkaConsumer.run((record) => (record.offset === 2n ? Effect.never : Effect.void))
      )
      const lagOf = Metric.value(
        Metric.withAttributes(Metrics.consumerLag, { group: "g", topic: "events", partition: "0" })
      ).pipe(Effect.map((state) => state.value))
      yield* advanceUntil(() => false, "500 millis", 6)
      // Committed up to the stuck record (2) of the 10 fetched: 8 behind, while the batch call never returns.
      assert.strictEqual(yield* lagOf, 8)
      const stopping = yield* Effect.forkChild(Fiber.interrupt(fiber))
      yield* TestClock.adjust("1 second")
      yield* Fiber.join(stopping)
      assert.strictEqual(yield* lagOf, 0, "another member reports it now")
    }).pipe(Effect.provide(setup(1, { shutdownTimeout: Duration.millis(500) })))
  )

  it.effect("progress is committed on the interval while a batch is still running", () =>
    Effect.gen(function* () {
      yield* InMemoryKafka.produce("events", [
        { key: "fast", value: "0" },
        { key: "slow", value: "1" }
      ])
      const slowStarted = yield* Deferred.make<void>()
      const fiber = yield* Effect.forkChild(
        KafkaConsumer.run((record) =>
          text(record.key) === "slow"
            ? Deferred.succeed(slowStarted, undefined).pipe(Effect.andThen(Effect.sleep("1 hour")))
            : Effect.void
        )
      )
      yield* Deferred.await(slowStarted)
      yield* TestClock.adjust("1 second")
      const broker = yield* InMemoryKafka.InMemoryBroker
      assert.strictEqual(yield* broker.committed("g", "events", 0), 1n, "record 0 done, record 1 running")
      yield* TestClock.adjust("1 hour")
      assert.strictEqual(yield* InMemoryKafka.awaitCommitted("g", "events", 0, 2n), 2n)
      yield* Fiber.interrupt(fiber)
    }).pipe(Effect.provide(setup(1)))
  )

  it.effect("a failing record is tried again until it succeeds; nothing after it is committed before", () =>
    Effect.gen(function* () {
      yield* InMemoryKafka.produce("events", [
        { key: "a", value: "flaky" },
        { key: "b", value: "fine" }
      ])
      let attempts = 0
      const firstAttempt = yield* Deferred.make<void>()
      const fiber = yield* Effect.forkChild(
        KafkaConsumer.run((record) =>
          text(record.value) === "flaky"
            ? Effect.suspend(() => {
                const attempt = ++attempts
                Deferred.doneUnsafe(firstAttempt, Effect.void)
                return attempt < 3 ? Effect.fail("transient" as const) : Effect.void
              })
            : Effect.void
        )
      )
      yield* Deferred.await(firstAttempt)
      const broker = yield* InMemoryKafka.InMemoryBroker
      assert.strictEqual(attempts, 1)
      assert.strictEqual(yield* broker.committed("g", "events", 0), undefined, "the flaky record blocks the commit")
      yield* advanceUntil(() => attempts >= 3, "50 millis", 1000)
      assert.strictEqual(yield* InMemoryKafka.awaitCommitted("g", "events", 0, 2n), 2n)
      yield* Fiber.interrupt(fiber)
    }).pipe(Effect.provide(setup(1)))
  )

  it.effect("a defect in a handler is treated as a failure, not a crash of the pool", () =>
    Effect.gen(function* () {
      yield* InMemoryKafka.produce("events", [{ key: "a", value: "boom" }])
      let attempts = 0
      const fiber = yield* Effect.forkChild(
        KafkaConsumer.run(() => Effect.suspend(() => (++attempts < 2 ? Effect.die(new Error("bug")) : Effect.void)))
      )
      yield* advanceUntil(() => attempts >= 2, "50 millis", 1000)
      assert.strictEqual(yield* InMemoryKafka.awaitCommitted("g", "events", 0, 1n), 1n)
      yield* Fiber.interrupt(fiber)
    }).pipe(Effect.provide(setup(1)))
  )

  it.effect("a member whose client crashed is restarted on the restart schedule, and goes on consuming", () =>
    Effect.gen(function* () {
      const inner = yield* KafkaClient.KafkaClient
      let connections = 0
      // The first connection reports a crash at once, as kafkajs does when it gives up.
      const crashing = withConnections((connection) =>
        ++connections === 1
          ? {
              ...connection,
              crashed: Effect.fail(
                new KafkaClient.KafkaError({
                  operation: "consume",
                  reason: new KafkaClient.ConnectionFailed({ brokers: "b", detail: "gone" })
                })
              )
            }
          : connection
      )(inner)
      const consumer = yield* KafkaConsumer.make(options()).pipe(
        Effect.provideService(KafkaClient.KafkaClient, crashing)
      )
      yield* InMemoryKafka.produce("events", [{ key: "a", value: "x" }])
      const fiber = yield* Effect.forkChild(consumer.run(() => Effect.void))
      yield* advanceUntil(() => connections >= 2, "100 millis", 200)
      assert.strictEqual(connections, 2, "restarted once")
      assert.strictEqual(yield* InMemoryKafka.awaitCommitted("g", "events", 0, 1n), 1n)
      yield* Fiber.interrupt(fiber)
    }).pipe(Effect.provide(InMemoryKafka.layer({ topics: [{ topic: "events", partitions: 1 }] })))
  )

  it.effect("a handler that throws instead of returning an effect, twice, does not stop its worker", () =>
    Effect.gen(function* () {
      yield* InMemoryKafka.produce("events", [
        { key: "a", value: "throws" },
        { key: "b", value: "fine" },
        { key: "c", value: "fine" }
      ])
      let throws = 0
      const handled: Array<string> = []
      const fiber = yield* Effect.forkChild(
        KafkaConsumer.run((record) => {
          const value = text(record.value)
          if (value === "throws" && ++throws <= 2) throw new Error("not an effect")
          return Effect.sync(() => handled.push(value))
        })
      )
      yield* advanceUntil(() => handled.length >= 3, "50 millis", 1000)
      assert.deepStrictEqual(handled, ["throws", "fine", "fine"], "the one worker went on, in order")
      assert.strictEqual(yield* InMemoryKafka.awaitCommitted("g", "events", 0, 3n), 3n)
      yield* Fiber.interrupt(fiber)
    }).pipe(Effect.provide(setup(1, { workers: 1 })))
  )

  it.effect("a handler that interrupts itself is tried again, and its record is committed only once it succeeds", () =>
    Effect.gen(function* () {
      yield* InMemoryKafka.produce("events", [
        { key: "a", value: "interrupts" },
        { key: "b", value: "fine" }
      ])
      let attempts = 0
      const fiber = yield* Effect.forkChild(
        KafkaConsumer.run((record) =>
          text(record.value) === "interrupts"
            ? Effect.suspend(() => (++attempts < 3 ? Effect.interrupt : Effect.void))
            : Effect.void
        )
      )
      const broker = yield* InMemoryKafka.InMemoryBroker
      // Tries 2 s apart: the commit ticks (1 s) and the end of a try pass while the record still fails.
      yield* advanceUntil(() => attempts >= 2, "100 millis", 1000)
      yield* TestClock.adjust("1500 millis")
      assert.strictEqual(attempts, 2)
      const committed = yield* broker.committed("g", "events", 0)
      assert.isTrue(committed === undefined || committed === 0n, `not committed past it while it fails: ${committed}`)
      yield* advanceUntil(() => attempts >= 3, "100 millis", 1000)
      assert.strictEqual(yield* InMemoryKafka.awaitCommitted("g", "events", 0, 2n), 2n)
      yield* Fiber.interrupt(fiber)
    }).pipe(Effect.provide(setup(1, { retrySchedule: Schedule.spaced("2 seconds") })))
  )

  it.effect("a commit that does not answer holds shutdown 5 s at most once the member stops", () =>
    Effect.gen(function* () {
      const inner = yield* KafkaClient.KafkaClient
      let hang = false
      // From `hang` on, commits never answer, as kafkajs retrying one against an unreachable coordinator.
      const hanging = withConnections((connection) => ({
        ...connection,
        commit: (offsets) => (hang ? Effect.never : connection.commit(offsets))
      }))(inner)
      yield* InMemoryKafka.produce("events", [
        { key: "k0", value: "0" },
        { key: "k1", value: "1" }
      ])
      const consumer = yield* KafkaConsumer.make(options({ shutdownTimeout: Duration.seconds(5) })).pipe(
        Effect.provideService(KafkaClient.KafkaClient, hanging)
      )
      // Record 1 finishes 2 s into shutdown: its commits (on the tick, and the batch call's last) never answer.
      const fiber = yield* Effect.forkChild(
        consumer.run((record) => (text(record.value) === "1" ? Effect.sleep("3 seconds") : Effect.void))
      )
      const broker = yield* InMemoryKafka.InMemoryBroker
      for (let i = 0; i < 20 && (yield* broker.committed("g", "events", 0)) !== 1n; i++) {
        yield* TestClock.adjust("100 millis")
      }
      assert.strictEqual(yield* broker.committed("g", "events", 0), 1n)
      hang = true
      const started = yield* Clock.currentTimeMillis
      const stopping = yield* Effect.forkChild(Fiber.interrupt(fiber))
      yield* advanceUntil(() => stopping.pollUnsafe() !== undefined, "100 millis", 200)
      assert.isDefined(stopping.pollUnsafe(), "shutdown ended")
      const took = (yield* Clock.currentTimeMillis) - started
      // The record's 2 s, a commit on the tick waited 5 s, and the last commit 5 s more at most.
      assert.isAtMost(took, 12_100, `shutdown took ${took} ms`)
    }).pipe(Effect.provide(InMemoryKafka.layer({ topics: [{ topic: "events", partitions: 1 }] })))
  )

  it.effect("with the window full and every commit failing (a fenced member), shutdown still ends in its timeout", () =>
    Effect.gen(function* () {
      const inner = yield* KafkaClient.KafkaClient
      let commitsTried = 0
      const fenced = withConnections((connection) => ({
        ...connection,
        commit: () =>
          Effect.suspend(() => {
            commitsTried++
            return Effect.fail(
              new KafkaClient.KafkaError({
                operation: "commit",
                reason: new KafkaClient.BrokerError({
                  type: "UNKNOWN_MEMBER_ID",
                  retriable: false,
                  detail: "fenced"
                })
              })
            )
          })
      }))(inner)
      yield* InMemoryKafka.produce(
        "events",
        Array.from({ length: 30 }, (_, i) => ({ key: `k${i}`, value: String(i) }))
      )
      const consumer = yield* KafkaConsumer.make(
        options({ maxInFlight: 10, shutdownTimeout: Duration.seconds(1) })
      ).pipe(Effect.provideService(KafkaClient.KafkaClient, fenced))
      let handled = 0
      const fiber = yield* Effect.forkChild(consumer.run(() => Effect.sync(() => handled++)))
      yield* advanceUntil(() => handled >= 10, "10 millis", 1000)
      // The window is full of finished, uncommittable records: the commits are tried again on every tick.
      const tried = commitsTried
      yield* TestClock.adjust("3 seconds")
      assert.isAbove(commitsTried, tried, "commits are tried again while the window waits")
      assert.strictEqual(handled, 10, "no record beyond the window")
      const stopping = yield* Effect.forkChild(Fiber.interrupt(fiber))
      yield* advanceUntil(() => stopping.pollUnsafe() !== undefined, "100 millis", 100)
      assert.isDefined(stopping.pollUnsafe(), "shutdown ended within 10 s of virtual time")
    }).pipe(Effect.provide(InMemoryKafka.layer({ topics: [{ topic: "events", partitions: 1 }] })))
  )

  it.effect(
    "with a finite retrySchedule a failing record is still tried until it succeeds, never committed before",
    () =>
      Effect.gen(function* () {
        yield* InMemoryKafka.produce("events", [{ key: "a", value: "flaky" }])
        let attempts = 0
        const fiber = yield* Effect.forkChild(
          KafkaConsumer.run(() =>
            Effect.suspend(() => (++attempts < 4 ? Effect.fail("transient" as const) : Effect.void))
          )
        )
        const broker = yield* InMemoryKafka.InMemoryBroker
        // One retry by the schedule, then every 30 s.
        yield* advanceUntil(() => attempts >= 3, "1 second", 200)
        yield* TestClock.adjust("5 seconds")
        assert.strictEqual(attempts, 3)
        const committed = yield* broker.committed("g", "events", 0)
        assert.isTrue(committed === undefined || committed === 0n, `not committed past it while it fails: ${committed}`)
        yield* advanceUntil(() => attempts >= 4, "1 second", 200)
        assert.strictEqual(yield* InMemoryKafka.awaitCommitted("g", "events", 0, 1n), 1n)
        yield* Fiber.interrupt(fiber)
      }).pipe(Effect.provide(setup(1, { retrySchedule: Schedule.recurs(1) })))
  )

  it.effect("a batch's last commit that fails is tried again until it succeeds, with no new records", () =>
    Effect.gen(function* () {
      const inner = yield* KafkaClient.KafkaClient
      let failing = true
      const flaky = withConnections((connection) => ({
        ...connection,
        commit: (offsets) =>
          failing
            ? Effect.fail(
                new KafkaClient.KafkaError({
                  operation: "commit",
                  reason: new KafkaClient.BrokerError({
                    type: "COORDINATOR_NOT_AVAILABLE",
                    retriable: true,
                    detail: ""
                  })
                })
              )
            : connection.commit(offsets)
      }))(inner)
      yield* InMemoryKafka.produce("events", [
        { key: "a", value: "1" },
        { key: "b", value: "2" }
      ])
      const consumer = yield* KafkaConsumer.make(options()).pipe(Effect.provideService(KafkaClient.KafkaClient, flaky))
      let handled = 0
      const fiber = yield* Effect.forkChild(consumer.run(() => Effect.sync(() => handled++)))
      yield* advanceUntil(() => handled >= 2, "10 millis", 1000)
      yield* TestClock.adjust("5 seconds")
      const broker = yield* InMemoryKafka.InMemoryBroker
      assert.strictEqual(yield* broker.committed("g", "events", 0), undefined, "nothing committed while commits fail")
      failing = false
      yield* TestClock.adjust("2 seconds")
      assert.strictEqual(yield* broker.committed("g", "events", 0), 2n, "committed once the coordinator is back")
      yield* Fiber.interrupt(fiber)
    }).pipe(Effect.provide(InMemoryKafka.layer({ topics: [{ topic: "events", partitions: 1 }] })))
  )

  it.effect("a slow commit does not hold up the heartbeats of a running batch", () =>
    Effect.gen(function* () {
      const inner = yield* KafkaClient.KafkaClient
      let heartbeats = 0
      let slow = true
      const slowCommits = withConnections((connection) => ({
        ...connection,
        run: (handle) =>
          connection.run((batch, session) =>
            handle(batch, {
              ...session,
              heartbeat: Effect.andThen(
                Effect.sync(() => heartbeats++),
                session.heartbeat
              )
            })
          ),
        // The first commit takes a minute (a coordinator retrying, say); later ones are quick.
        commit: (offsets) =>
          Effect.suspend(() => {
            if (!slow) return connection.commit(offsets)
            slow = false
            return Effect.andThen(Effect.sleep("1 minute"), connection.commit(offsets))
          })
      }))(inner)
      yield* InMemoryKafka.produce("events", [
        { key: "a", value: "quick" },
        { key: "b", value: "long" }
      ])
      const consumer = yield* KafkaConsumer.make(options({ heartbeatInterval: Duration.seconds(1) })).pipe(
        Effect.provideService(KafkaClient.KafkaClient, slowCommits)
      )
      const fiber = yield* Effect.forkChild(
        consumer.run((record) => (text(record.value) === "long" ? Effect.sleep("2 minutes") : Effect.void))
      )
      // The quick record's progress is committed on the first tick, slowly; the long record keeps the batch open.
      yield* TestClock.adjust("2 seconds")
      const before = heartbeats
      yield* TestClock.adjust("30 seconds")
      assert.isAtLeast(heartbeats - before, 25, `heartbeats went on during the slow commit (${heartbeats - before})`)
      // Shutdown waits for the long record (up to the shutdown timeout) and the slow commit, in virtual time.
      const stopping = yield* Effect.forkChild(Fiber.interrupt(fiber))
      yield* TestClock.adjust("3 minutes")
      yield* Fiber.join(stopping)
    }).pipe(Effect.provide(InMemoryKafka.layer({ topics: [{ topic: "events", partitions: 1 }] })))
  )

  it.effect("a failure that cannot be printed (its message getter throws) is retried like any other", () =>
    Effect.gen(function* () {
      yield* InMemoryKafka.produce("events", [
        { key: "a", value: "hostile" },
        { key: "a", value: "after" }
      ])
      const hostile = {
        get message(): string {
          throw new Error("no message")
        }
      }
      let attempts = 0
      const handled: Array<string> = []
      const fiber = yield* Effect.forkChild(
        KafkaConsumer.run((record) =>
          text(record.value) === "hostile" && ++attempts < 2
            ? Effect.fail(hostile)
            : Effect.sync(() => handled.push(text(record.value)))
        )
      )
      yield* advanceUntil(() => handled.length >= 2, "50 millis", 1000)
      assert.deepStrictEqual(handled, ["hostile", "after"])
      assert.strictEqual(yield* InMemoryKafka.awaitCommitted("g", "events", 0, 2n), 2n)
      yield* Fiber.interrupt(fiber)
    }).pipe(Effect.provide(setup(1, { workers: 1 })))
  )
})
