/**
 * The producer program as users run it: a separate Node process, configured by environment variables.
 * It runs from src/ with Node's type stripping, so the test needs no build.
 */
import * as Path from "node:path"
import { assert, describe, it } from "@effect/vitest"
import { Deferred, Effect } from "effect"
import { inject } from "vitest"
import * as Program from "../scripts/program.ts"
import { createTopic, readTopic, uniqueName } from "./support/kafka.ts"

const brokers = inject("kafkaBrokers")
const program = Path.join(import.meta.dirname, "..", "src", "producer.ts")

/** The producer program run to its end with `env` (JSON logs) and `stdin`. */
const runProgram = (options: Parameters<typeof Program.run>[1]) =>
  Program.run(program, { ...options, env: { LOG_FORMAT: "json", ...options.env } })

const event = (id: string, subject: string) =>
  JSON.stringify({
    id,
    type: "order.created",
    source: "test",
    timestamp: "2026-11-27T10:00:00.000Z",
    subject,
    payload: { id }
  })

describe("node dist/producer.js", () => {
  it.live("NDJSON on stdin: valid lines are sent, invalid ones reported by line number, exit code 1", () =>
    Effect.gen(function* () {
      const topic = uniqueName("program")
      yield* createTopic(brokers, topic, 3)
      const lines = [
        event("e1", "order-1"),
        "{not json",
        event("e2", "order-1"),
        JSON.stringify({ id: "e3", type: "order.paid", source: "test", timestamp: "yesterday", payload: {} }),
        "",
        event("e4", "order-2"),
        JSON.stringify({ id: "e5", type: "order.paid", source: "test", timestamp: "2026-11-27T10:00:00Z" })
      ]
      const run = yield* runProgram({
        env: { KAFKA_BROKERS: brokers, KAFKA_PRODUCER_TOPIC: topic },
        stdin: `${lines.join("\n")}\n`
      })

      assert.strictEqual(run.exitCode, 1, run.stderr)
      assert.match(run.stdout, /summary: sent 3, invalid 3, failed 0/)
      assert.include(run.stderr, "line 2: invalid event")
      assert.match(run.stderr, /line 4: invalid event: .*timestamp/)
      assert.match(run.stderr, /line 7: invalid event: .*payload/)
      const stored = yield* readTopic(brokers, topic)
      assert.sameMembers(
        stored.map((r) => JSON.parse(r.value ?? "{}").id),
        ["e1", "e2", "e4"]
      )
      const first = stored.find((r) => r.key === "order-1" && JSON.parse(r.value ?? "{}").id === "e1")
      const second = stored.find((r) => JSON.parse(r.value ?? "{}").id === "e2")
      assert.isTrue(first !== undefined && second !== undefined && first.offset < second.offset, "order-1 in order")
    })
  )

  it.live(
    "SIGTERM while sends linger: reading stops, the sends started finish and are counted, an invalid line still exits 1",
    () =>
      Effect.gen(function* () {
        const topic = uniqueName("program-stop")
        yield* createTopic(brokers, topic, 3)
        const valid = Array.from({ length: 50 }, (_, i) => event(`s${i}`, `subject-${i % 7}`))
        const signalled = yield* Deferred.make<void>()
        const run = yield* runProgram({
          // A linger of a minute: the 50 records wait in the producer when the signal comes; stdin stays open, so
          // the program is waiting for more lines too.
          env: { KAFKA_BROKERS: brokers, KAFKA_PRODUCER_TOPIC: topic, KAFKA_PRODUCER_LINGER_MS: "60000" },
          stdin: `${valid.join("\n")}\n{not json\n`,
          keepStdinOpen: true,
          // Lines are decoded in order and each valid one's send is started before the next is decoded: line 51's
          // report means the 50 sends are under way.
          onStderr: (soFar, started) => {
            if (soFar.includes("line 51: invalid event") && Deferred.doneUnsafe(signalled, Effect.void)) {
              started.child.kill("SIGTERM")
            }
          },
          timeout: 30_000
        })
        assert.isTrue(yield* Deferred.isDone(signalled), run.stderr)
        assert.strictEqual(run.exitCode, 1, run.stderr)
        assert.match(run.stdout, /summary: sent 50, invalid 1, failed 0/)
        assert.lengthOf(yield* readTopic(brokers, topic), 50)
      })
  )

  it.live(
    "at its defaults past the README's counts: --count 20000 --rate 0 sends 20,000, and the topic holds exactly that",
    () =>
      Effect.gen(function* () {
        const topic = uniqueName("program-20k")
        const run = yield* runProgram({
          args: ["--create-topic", "--count", "20000", "--rate", "0"],
          env: { KAFKA_BROKERS: brokers, KAFKA_PRODUCER_TOPIC: topic }
        })
        assert.strictEqual(run.exitCode, 0, run.stderr)
        assert.match(run.stdout, /summary: sent 20000, invalid 0, failed 0/)
        assert.lengthOf(yield* readTopic(brokers, topic), 20_000)
      })
  )

  it.live(
    "100,000 NDJSON lines on stdin: every one sent, and the topic holds exactly that",
    () =>
      Effect.gen(function* () {
        const topic = uniqueName("program-100k")
        yield* createTopic(brokers, topic, 6)
        const lines = Array.from({ length: 100_000 }, (_, i) => event(`n${i}`, `subject-${i % 100}`))
        const run = yield* runProgram({
          env: { KAFKA_BROKERS: brokers, KAFKA_PRODUCER_TOPIC: topic },
          stdin: `${lines.join("\n")}\n`,
          // It logs its progress every 5 s: killed only once that stops, however slow a busy machine makes it.
          stallTimeout: 30_000
        })
        assert.strictEqual(run.exitCode, 0, run.stderr)
        assert.match(run.stdout, /summary: sent 100000, invalid 0, failed 0/)
        const stored = yield* readTopic(brokers, topic)
        assert.strictEqual(new Set(stored.map((r) => JSON.parse(r.value ?? "{}").id)).size, 100_000)
      }),
    600_000
  )

  it.live("a topic that does not exist is reported once, before any event, with the hint, exit 2", () =>
    Effect.gen(function* () {
      const run = yield* runProgram({
        args: ["--count", "1000", "--rate", "0"],
        env: { KAFKA_BROKERS: brokers, KAFKA_PRODUCER_TOPIC: uniqueName("evnts") }
      })
      assert.strictEqual(run.exitCode, 2, run.stderr)
      assert.match(
        run.stderr,
        /topic evnts-\S+ does not exist \(KAFKA_PRODUCER_TOPIC\); create it, or pass --create-topic/
      )
      assert.notInclude(run.stderr, "send failed")
      assert.notInclude(run.stderr, '"level":"ERROR"')
    })
  )

  it.live("all lines valid: exit code 0", () =>
    Effect.gen(function* () {
      const topic = uniqueName("program-ok")
      yield* createTopic(brokers, topic, 1)
      const run = yield* runProgram({
        env: { KAFKA_BROKERS: brokers, KAFKA_PRODUCER_TOPIC: topic },
        stdin: `${event("a", "s")}\n${event("b", "s")}\n`
      })
      assert.strictEqual(run.exitCode, 0, run.stderr)
      assert.match(run.stdout, /summary: sent 2, invalid 0, failed 0/)
      assert.lengthOf(yield* readTopic(brokers, topic), 2)
    })
  )

  it.live("a bad environment variable stops start-up naming it, with exit code 2", () =>
    Effect.gen(function* () {
      const run = yield* runProgram({ env: { KAFKA_BROKERS: brokers, KAFKA_PRODUCER_ACKS: "2" }, stdin: "" })
      assert.strictEqual(run.exitCode, 2)
      assert.include(run.stderr, 'KAFKA_PRODUCER_ACKS is "2"; expected all (or -1), 1 (or leader), 0 (or none)')
    })
  )

  it.live(
    "generated events until SIGTERM: flushes, prints the summary, exits 0, and every counted send is stored",
    () =>
      Effect.gen(function* () {
        const topic = uniqueName("program-sigterm")
        yield* createTopic(brokers, topic, 3)
        const signalled = yield* Deferred.make<void>()
        const run = yield* runProgram({
          args: ["--count", "0", "--rate", "2000"],
          env: { KAFKA_BROKERS: brokers, KAFKA_PRODUCER_TOPIC: topic },
          // The first progress line means events are flowing: stop it then.
          onStderr: (soFar, started) => {
            if (soFar.includes("progress: sent") && Deferred.doneUnsafe(signalled, Effect.void)) {
              started.child.kill("SIGTERM")
            }
          }
        })
        assert.strictEqual(run.exitCode, 0, run.stderr)
        const sent = Number(/summary: sent (\d+), invalid 0, failed 0/.exec(run.stdout)?.[1] ?? Number.NaN)
        assert.isAbove(sent, 0)
        assert.lengthOf(yield* readTopic(brokers, topic), sent, "what the summary counts is what the topic holds")
      })
  )
})
