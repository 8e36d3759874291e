import * as Fs from "node:fs"
import * as Path from "node:path"
import { assert, describe, it } from "@effect/vitest"
import { Clock, Duration, Effect, Fiber, Logger, Ref } from "effect"
import { TestClock } from "effect/testing"
import * as KafkaClient from "../src/KafkaClient.ts"

const unreachable = new KafkaClient.KafkaError({
  operation: "connect",
  reason: new KafkaClient.ConnectionFailed({ brokers: "localhost:9092", detail: "ECONNREFUSED" })
})
const badPassword = new KafkaClient.KafkaError({
  operation: "connect",
  reason: new KafkaClient.AuthenticationFailed({ detail: "SASL SCRAM-SHA-256 authentication failed" })
})

/** Connect attempts that fail `failures` times with `error`, recording the virtual time of each attempt. */
const attempts = (error: KafkaClient.KafkaError, failures: number) =>
  Effect.gen(function* () {
    const times = yield* Ref.make<ReadonlyArray<number>>([])
    const connect = Effect.gen(function* () {
      const now = yield* Clock.currentTimeMillis
      const tried = yield* Ref.updateAndGet(times, (list) => [...list, now])
      if (tried.length <= failures) return yield* error
      return "connected" as const
    })
    return { connect, times: Ref.get(times) }
  })

/** Runs `effect` with a logger that keeps the messages, and returns them with its result. */
const withLogs = <A, E>(effect: Effect.Effect<A, E>) =>
  Effect.gen(function* () {
    const messages: Array<string> = []
    const logger = Logger.make(({ message }) => {
      messages.push((Array.isArray(message) ? message : [message]).map(String).join(" "))
    })
    const result = yield* effect.pipe(Effect.provide(Logger.layer([logger])))
    return { result, messages }
  })

describe("KafkaClient.reconnectSchedule", () => {
  it.effect("waits for the broker: exponential delays, jittered within 80–120 %, capped", () =>
    Effect.gen(function* () {
      const initial = Duration.millis(100)
      const max = Duration.millis(1000)
      const { connect, times } = yield* attempts(unreachable, 8)
      const fiber = yield* Effect.forkChild(
        withLogs(KafkaClient.retryConnect(connect, KafkaClient.reconnectSchedule({ initial, max })))
      )
      // Virtual time moves in 5 ms steps: each attempt is seen within 5 ms of its due time.
      for (let step = 0; step < 2000 && fiber.pollUnsafe() === undefined; step++) yield* TestClock.adjust("5 millis")
      const { result, messages } = yield* Fiber.join(fiber)
      assert.strictEqual(result, "connected")
      assert.strictEqual(messages.length, 8, "each failed attempt is logged")
      assert.match(
        messages[0] ?? "",
        /^Kafka not reachable at localhost:9092 \(attempt 1\): ECONNREFUSED; retrying in \d+ms \(is KAFKA_BROKERS right\?\)/
      )

      const at = yield* times
      assert.strictEqual(at.length, 9, "eight failures, then the ninth attempt connects")
      const delays = at.slice(1).map((time, i) => time - (at[i] ?? 0))
      delays.forEach((delay, i) => {
        const nominal = Math.min(100 * 2 ** i, 1000)
        assert.isAtLeast(delay, Math.min(nominal * 0.8, 1000) - 5, `delay ${i + 1} (${delay} ms) ≥ 80 % of ${nominal}`)
        assert.isAtMost(
          delay,
          Math.min(nominal * 1.2, 1000) + 5,
          `delay ${i + 1} (${delay} ms) ≤ 120 % of ${nominal}, ≤ cap`
        )
      })
      assert.isAtMost(Math.max(...delays), 1005, "never above the cap")
      assert.isAtLeast(delays.at(-1) ?? 0, 995, "the late delays sit at the cap")
    })
  )

  it.effect("an authentication failure is not retried", () =>
    Effect.gen(function* () {
      const { connect, times } = yield* attempts(badPassword, 100)
      const { result: error, messages } = yield* withLogs(
        Effect.flip(
          KafkaClient.retryConnect(
            connect,
            KafkaClient.reconnectSchedule({ initial: Duration.millis(100), max: Duration.seconds(1) })
          )
        )
      )
      assert.deepStrictEqual(messages, [], "not logged as a reconnect attempt")
      assert.strictEqual(error.reason._tag, "AuthenticationFailed")
      assert.isFalse(error.retriable)
      assert.strictEqual((yield* times).length, 1)
    })
  )

  it.effect("KafkaError says what failed, where, and whether it is retriable", () =>
    Effect.sync(() => {
      const error = new KafkaClient.KafkaError({
        operation: "produce",
        topic: "orders",
        partition: 3,
        reason: new KafkaClient.BrokerError({ type: "NOT_LEADER_OR_FOLLOWER", retriable: true, detail: "leader moved" })
      })
      assert.isTrue(error.retriable)
      assert.strictEqual(error.message, "produce on orders[3] failed (BrokerError, retriable): leader moved")
      const missing = new KafkaClient.KafkaError({
        operation: "produce",
        topic: "nope",
        reason: new KafkaClient.UnknownTopic({ topic: "nope" })
      })
      assert.isFalse(missing.retriable)
      assert.include(missing.message, "topic nope does not exist")
    })
  )

  it.effect("the port imports no engine: an engine is loaded only when chosen, and engines import the port", () =>
    Effect.sync(() => {
      const port = Fs.readFileSync(Path.join(import.meta.dirname, "..", "src", "KafkaClient.ts"), "utf8")
      assert.notMatch(port, /^import .*engines/m)
      const engine = Fs.readFileSync(
        Path.join(import.meta.dirname, "..", "src", "engines", "kafkajs", "KafkaJS.ts"),
        "utf8"
      )
      assert.match(engine, /^import \* as KafkaClient from "\.\.\/\.\.\/KafkaClient\.ts"/m)
    })
  )
})
