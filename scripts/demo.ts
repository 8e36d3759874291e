/**
 * The demo (`npm run demo`): the consumer and producer programs on a workload with invalid and failing events,
 * then what happened.
 *
 *   node --experimental-strip-types scripts/demo.ts [--events N] [--transient R] [--permanent R] [--from-src]
 *
 * Uses the broker in KAFKA_BROKERS, or starts a local one (scripts/kafka) for the run and stops it after. Topics
 * are named for the run (`demo-<time>`, its retry topics and DLQ) and created by the consumer program. Steps:
 * start `consumer.js` with shares of simulated transient and permanent failures; run `producer.js` for N events;
 * send five poison records (invalid JSON, a schema violation, non-UTF-8 bytes, a null value, an unsupported
 * type); wait until the main group and every retry group have committed everything; stop the consumer (SIGTERM,
 * graceful); `consumer.js replay --dry-run`; print the counts and check that they add up (exit 1 if not).
 * `--from-src` runs the programs from src/ with type stripping instead of dist/ (the tests use it).
 */
import type { ChildProcess } from "node:child_process"
import * as Path from "node:path"
import { parseArgs } from "node:util"
import { Effect } from "effect"
import { Kafka, logLevel } from "kafkajs"
import * as Broker from "./kafka/broker.ts"
import * as Program from "./program.ts"

const { values } = parseArgs({
  options: {
    events: { type: "string", default: "1000" },
    transient: { type: "string", default: "0.1" },
    permanent: { type: "string", default: "0.02" },
    "from-src": { type: "boolean", default: false }
  }
})
const events = Number(values.events)
const script = (name: "consumer" | "producer") =>
  values["from-src"] ? Path.join(Program.root, "src", `${name}.ts`) : Path.join(Program.root, "dist", `${name}.js`)

const say = (line: string) => process.stdout.write(`[demo] ${line}\n`)

const started = process.env.KAFKA_BROKERS
  ? undefined
  : await Effect.runPromise(Broker.start({})).then((broker) => {
      say(`started a local Kafka broker at ${broker.brokers}`)
      return broker
    })
const brokers = process.env.KAFKA_BROKERS ?? started?.brokers ?? ""

const stamp = `demo-${Date.now()}`
const topics = {
  main: stamp,
  retries: [1, 2, 3].map((n) => `${stamp}-retry-${n}`),
  dlq: `${stamp}-dlq`
}
const group = `${stamp}-group`
const env: Record<string, string> = {
  PATH: process.env.PATH ?? "",
  KAFKA_BROKERS: brokers,
  KAFKA_PRODUCER_TOPIC: topics.main,
  KAFKA_CONSUMER_TOPIC: topics.main,
  KAFKA_CONSUMER_GROUP_ID: group,
  KAFKA_RETRY_TOPIC_PREFIX: `${stamp}-retry`,
  KAFKA_CONSUMER_RETRY_MAX: "3",
  KAFKA_RETRY_DELAYS_MS: "1000,2000,4000",
  KAFKA_DLQ_TOPIC: topics.dlq,
  KAFKA_CREATE_TOPICS: "true",
  KAFKA_CONSUMER_COMMIT_INTERVAL_MS: "200",
  LOG_FORMAT: "json",
  LOG_LEVEL: process.env.LOG_LEVEL ?? "warn"
}

interface Run {
  readonly child: ChildProcess
  readonly exited: Promise<{ readonly code: number | null; readonly stdout: string; readonly stderr: string }>
}

const run = (name: "consumer" | "producer", args: ReadonlyArray<string>): Run => {
  const started = Program.start(script(name), { args, env })
  return {
    child: started.child,
    exited: Effect.runPromise(started.exited).then((code) => ({ code, ...started.output() }))
  }
}

const fail = (message: string, details = ""): never => {
  process.stderr.write(`[demo] FAILED: ${message}\n${details}`)
  process.exitCode = 1
  throw new Error(message)
}

const kafka = new Kafka({ clientId: "kafka-effect-demo", brokers: brokers.split(","), logLevel: logLevel.NOTHING })
const admin = kafka.admin()

/** Sum of a topic's end offsets, and of what `groupId` committed there. */
const progress = async (topic: string, groupId: string) => {
  const ends = await admin.fetchTopicOffsets(topic)
  const [committed] = await admin.fetchOffsets({ groupId, topics: [topic] })
  const end = ends.reduce((sum, p) => sum + Number(p.offset), 0)
  const done = (committed?.partitions ?? []).reduce((sum, p) => sum + Math.max(0, Number(p.offset)), 0)
  return { end, done }
}

const sum = (counts: Readonly<Record<string, number>>) => Object.values(counts).reduce((a, b) => a + b, 0)

let consumer: Run | undefined
try {
  await admin.connect()
  // 1. The consumer program; it creates the topics, then joins its groups.
  consumer = run("consumer", ["--transient-failures", values.transient, "--permanent-failures", values.permanent])
  let exited = false
  const early = consumer.exited.then((exit) => {
    exited = true
    return exit
  })
  while (!(await admin.listTopics()).includes(topics.dlq)) {
    if (exited) {
      const exit = await early
      fail(`the consumer exited with ${exit.code}`, exit.stderr)
    }
    await new Promise((resolve) => setTimeout(resolve, 200))
  }
  say(`consumer running: ${topics.main} → ${topics.retries.join(", ")} → ${topics.dlq}`)

  // 2. The producer program: N generated events.
  const producer = await run("producer", ["--generate", "--count", String(events), "--rate", "0"]).exited
  if (producer.code !== 0) fail(`the producer exited with ${producer.code}`, producer.stderr)
  const sent = Number(/summary: sent (\d+)/.exec(producer.stdout)?.[1] ?? Number.NaN)
  say(producer.stdout.trim())

  // 3. Poison records, as a careless producer might send them.
  const poison = kafka.producer()
  await poison.connect()
  const valid = { id: "x", source: "demo", timestamp: new Date().toISOString(), payload: {} }
  await poison.send({
    topic: topics.main,
    messages: [
      { key: "poison-1", value: '{"id": "p1", "type": ' },
      { key: "poison-2", value: JSON.stringify({ ...valid, id: "p2", type: "order.created", timestamp: "yesterday" }) },
      { key: "poison-3", value: Buffer.from([0xff, 0xfe, 0x00, 0x41]) },
      { key: "poison-4", value: null },
      { key: "poison-5", value: JSON.stringify({ ...valid, id: "p5", type: "order.teleported" }) }
    ]
  })
  await poison.disconnect()
  say("sent 5 poison records: invalid JSON, a schema violation, non-UTF-8 bytes, a null value, an unsupported type")

  // 4. Wait until every group has committed everything: nothing in flight, nothing waiting in a retry topic.
  //    Read in ladder order: a hop is produced before its source is committed, so this cannot miss one.
  const deadline = Date.now() + 180_000
  while (true) {
    const stages = [
      await progress(topics.main, group),
      ...(await Promise.all(topics.retries.map((topic, i) => progress(topic, `${group}-retry-${i + 1}`))))
    ]
    if (stages[0]?.end === sent + 5 && stages.every((stage) => stage.done === stage.end)) break
    if (Date.now() > deadline) fail(`not settled after 180 s: ${JSON.stringify(stages)}`)
    await new Promise((resolve) => setTimeout(resolve, 500))
  }

  // 5. Stop the consumer gracefully; it prints its summary.
  consumer.child.kill("SIGTERM")
  const stopped = await consumer.exited
  if (stopped.code !== 0) fail(`the consumer exited with ${stopped.code} after SIGTERM`, stopped.stderr)
  const summaryLine = /summary: (.*)/.exec(stopped.stdout)?.[1]
  if (summaryLine === undefined) fail("the consumer printed no summary", stopped.stdout)
  const stats = JSON.parse(summaryLine ?? "{}") as {
    done: number
    retriedInPlace: number
    retried: Record<string, number>
    deadLettered: Record<string, number>
  }

  // 6. What could be replayed.
  const replay = await run("consumer", ["replay", "--dry-run"]).exited
  const replayable = JSON.parse(/replay \(dry run\): (.*)/.exec(replay.stdout)?.[1] ?? "{}") as {
    matched?: number
    withoutValue?: number
  }

  const produced = sent + 5
  const deadLettered = sum(stats.deadLettered)
  const retriedBy = topics.retries.map((topic) => stats.retried[topic] ?? 0)
  const lines = [
    ["produced", `${produced} (${sent} events from the producer program + 5 poison records)`],
    ["processed", `${stats.done} (after ${stats.retriedInPlace} in-place retries)`],
    ["retried", `${sum(stats.retried)} hops (${topics.retries.map((t, i) => `${t}: ${retriedBy[i]}`).join(", ")})`],
    [
      "dead-lettered",
      `${deadLettered} (${Object.entries(stats.deadLettered)
        .map(([tag, n]) => `${tag}: ${n}`)
        .join(", ")})`
    ],
    [
      "replayable",
      `${replayable.matched ?? "?"} in ${topics.dlq}, and ${replayable.withoutValue ?? "?"} without a value left alone ` +
        "(node dist/consumer.js replay --dry-run)"
    ]
  ]
  for (const [label, text] of lines) process.stdout.write(`  ${label?.padEnd(14)} ${text}\n`)
  const checks: Array<[string, boolean]> = [
    ["processed + dead-lettered = produced", stats.done + deadLettered === produced],
    [
      "every record that left retry topic N came from retry topic N-1",
      retriedBy.every((n, i) => i === 0 || n <= (retriedBy[i - 1] ?? 0))
    ],
    ["every poison record was dead-lettered", deadLettered >= 5],
    [
      "what the DLQ holds is what was dead-lettered",
      (replayable.matched ?? 0) + (replayable.withoutValue ?? 0) === deadLettered
    ]
  ]
  for (const [check, ok] of checks) process.stdout.write(`  ${ok ? "✓" : "✗"} ${check}\n`)
  if (checks.some(([, ok]) => !ok)) fail("the counts do not add up")
} finally {
  consumer?.child.kill("SIGKILL")
  await admin.disconnect().catch(() => undefined)
  if (started !== undefined) await Effect.runPromise(Broker.stop(started))
}
