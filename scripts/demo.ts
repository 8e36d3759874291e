/**
 * The demo (`npm run demo`): the consumer and producer programs on a workload with invalid and failing events,
 * then what happened.
 *
 *   node --experimental-strip-types scripts/demo.ts [--events N] [--transient R] [--permanent R] [--from-src]
 *
 * Uses the broker in KAFKA_BROKERS, or starts a local one (scripts/kafka) for the run and stops it after. Topics
 * are named for the run (`demo-<time>`, its retry topics and DLQ) and created by the consumer program. `--from-src`
 * runs the programs from src/ with type stripping instead of dist/ (the tests use it).
 *
 * It runs in phases (`limits` below), each printing `[demo] <phase>: …` when it starts and failing when it outlives
 * its time limit: `jars` and `broker` (a local broker, unless KAFKA_BROKERS names one), `consumer start` (the
 * consumer program with shares of simulated transient and permanent failures, until it created its topics),
 * `produce` (the producer program for N events), `poison` (five poison records: invalid JSON, a schema violation,
 * non-UTF-8 bytes, a null value, an unsupported type), `settle` (until the main group and every retry group have
 * committed everything), `consumer stop` (SIGTERM, graceful: it prints its summary), `replay` (`consumer.js replay
 * --dry-run`) and `report` (the counts, and checks that they add up).
 *
 * Whatever the ending (success, a failed phase, SIGINT or SIGTERM), it stops what it started, by PID: a program
 * still running gets SIGTERM, then SIGKILL after `grace`; the local broker gets `Broker.stop`. It prints each PID
 * as it starts the process (`… (pid N)`).
 *
 * Exit codes: 0 the counts add up; 1 a phase failed or timed out (`[demo] FAILED in phase <name>: <why>` on
 * stderr), or the counts do not add up; 2 a flag is invalid; 130 and 143 stopped by SIGINT and SIGTERM (128 + the
 * signal's number).
 */
import * as Os from "node:os"
import * as Path from "node:path"
import { parseArgs } from "node:util"
import { Cause, Data, Duration, Effect, Exit, Fiber, Schedule, type Scope } from "effect"
import { type Admin, Kafka, logLevel } from "kafkajs"
import * as Broker from "./kafka/broker.ts"
import * as Program from "./program.ts"

/**
 * Each phase's time limit at the default 1,000 events: several times what it takes on a busy 2-core machine, where
 * a whole run takes 23-29 s with a broker of its own (measured with a test run going alongside), so that a limit
 * catches a phase that hangs, not a slow one. `produce`, `settle` and `replay` do work in proportion to the events;
 * above 1,000 their limits grow in proportion.
 */
const limits = {
  /** `mvn` fetches the broker's jars (about 55 MB) on the first run only; later runs find them cached at once. */
  jars: "10 minutes",
  /** Up in 3-6 s; past its own 120 s, `Broker.start` fails with the end of the broker's log, the better message. */
  broker: "150 seconds",
  /** Node starts the program, which creates five topics: 1-2 s. */
  "consumer start": "60 seconds",
  /** 1,000 events in under a second, after the program's start-up: 1-2 s. */
  produce: "60 seconds",
  /** Five records from a connected client: well under a second. */
  poison: "30 seconds",
  /** The retry delays alone (1 s, 2 s, 4 s) take 7 s: 15-21 s in all. */
  settle: "120 seconds",
  /**
   * A last commit and leaving four groups: under a second. Above the program's own bound on a hung broker, its
   * KAFKA_CONSUMER_SHUTDOWN_TIMEOUT_MS (30 s) + 15 s, so that its own exit and message are what is reported.
   */
  "consumer stop": "60 seconds",
  /** Reading the DLQ after the program's start-up: about a second. */
  replay: "60 seconds",
  /** Printing. */
  report: "5 seconds"
} satisfies Record<string, Duration.Input>

type Phase = keyof typeof limits

/** How long a program has between SIGTERM and SIGKILL when the demo stops it. */
const grace = "10 seconds"

const say = (line: string) => process.stdout.write(`[demo] ${line}\n`)

const usage = (problem: string): never => {
  process.stderr.write(
    `[demo] ${problem}\nusage: scripts/demo.ts [--events N] [--transient R] [--permanent R] [--from-src]\n`
  )
  return process.exit(2)
}

const flags = (() => {
  try {
    return parseArgs({
      options: {
        events: { type: "string", default: "1000" },
        transient: { type: "string", default: "0.1" },
        permanent: { type: "string", default: "0.02" },
        "from-src": { type: "boolean", default: false }
      }
    }).values
  } catch (error) {
    return usage(error instanceof Error ? error.message : String(error))
  }
})()
const events = /^\d{1,9}$/.test(flags.events) ? Number(flags.events) : usage(`--events: not a count: ${flags.events}`)
for (const share of ["transient", "permanent"] as const) {
  const value = Number(flags[share])
  if (flags[share] === "" || !(value >= 0 && value <= 1)) usage(`--${share}: not a share from 0 to 1: ${flags[share]}`)
}

const limitOf = (phase: Phase) =>
  phase === "produce" || phase === "settle" || phase === "replay"
    ? Duration.times(Duration.fromInputUnsafe(limits[phase]), Math.max(1, events / 1000))
    : Duration.fromInputUnsafe(limits[phase])

/** Why a phase failed, in a sentence (with the end of a program's stderr when a program failed). */
class PhaseError extends Data.TaggedError("PhaseError")<{ readonly message: string }> {}

class PhaseFailed extends Data.TaggedError("PhaseFailed")<{ readonly phase: Phase; readonly message: string }> {}

/** The phase running now, for a signal's message. */
let current: Phase | undefined

/**
 * Runs `work` as `name`: says so, and fails with a `PhaseFailed` (printed at once, before the clean-up) if it
 * fails, dies or outlives its limit; `timedOut` adds what the phase saw last.
 */
const phase = <A, E extends { readonly message: string }, R>(
  name: Phase,
  what: string,
  work: Effect.Effect<A, E, R>,
  timedOut: () => string = () => ""
): Effect.Effect<A, PhaseFailed, R> =>
  Effect.suspend(() => {
    current = name
    say(`${name}: ${what} (limit ${Duration.format(limitOf(name))})`)
    return work
  }).pipe(
    Effect.timeoutOrElse({
      duration: limitOf(name),
      orElse: () =>
        Effect.fail(
          new PhaseError({
            message: `not done within ${Duration.format(limitOf(name))}${timedOut() && `: ${timedOut()}`}`
          })
        )
    }),
    Effect.catchDefect((defect) => Effect.fail(new PhaseError({ message: `a defect: ${String(defect)}` }))),
    Effect.mapError((error) => new PhaseFailed({ phase: name, message: error.message })),
    Effect.tapError((failed) =>
      Effect.sync(() => process.stderr.write(`[demo] FAILED in phase ${failed.phase}: ${failed.message}\n`))
    )
  )

// --- Programs as child processes ---

const script = (name: "consumer" | "producer") =>
  flags["from-src"] ? Path.join(Program.root, "src", `${name}.ts`) : Path.join(Program.root, "dist", `${name}.js`)

interface Child {
  readonly label: string
  readonly program: Program.Program
}

const hasExited = (child: Child) => child.program.child.exitCode !== null || child.program.child.signalCode !== null

/** The last lines of what `child` printed on stderr, indented, for a failure's message. */
const stderrTail = (child: Child) => {
  const lines = child.program.output().stderr.trimEnd().split("\n").slice(-20)
  return lines.join("") === ""
    ? " (nothing on stderr)"
    : `; its stderr ends with:\n${lines.map((l) => `    ${l}`).join("\n")}`
}

const exitedWith = (child: Child, code: number | null) =>
  new PhaseError({
    message: `${child.label} exited with ${code ?? `signal ${child.program.child.signalCode}`}${stderrTail(child)}`
  })

/**
 * `child` stopped by its PID: SIGTERM, then SIGKILL after `grace`. Nothing to do if it has exited; a SIGKILLed
 * process that still holds its pipes open is not waited for long.
 */
const stopChild = (child: Child) =>
  Effect.gen(function* () {
    if (hasExited(child)) return
    say(`stopping ${child.label} (pid ${child.program.child.pid})`)
    child.program.child.kill("SIGTERM")
    yield* child.program.exited.pipe(
      Effect.timeoutOrElse({
        duration: grace,
        orElse: () =>
          Effect.sync(() => child.program.child.kill("SIGKILL")).pipe(
            Effect.andThen(Effect.timeoutOption(child.program.exited, "5 seconds"))
          )
      })
    )
  })

/** A program run as a child process for the life of the scope, stopped with `stopChild` when the scope closes. */
const spawnChild = (
  label: string,
  name: "consumer" | "producer",
  args: ReadonlyArray<string>,
  env: Record<string, string>
): Effect.Effect<Child, never, Scope.Scope> =>
  Effect.acquireRelease(
    Effect.sync(() => {
      const child = { label, program: Program.start(script(name), { args, env }) }
      say(`started ${label} (pid ${child.program.child.pid})`)
      return child
    }),
    stopChild
  )

/** How `child` exited: its code and output, or a `PhaseError` if the code is not 0. */
const exitedCleanly = (child: Child) =>
  Effect.flatMap(child.program.exited, (code) =>
    code === 0 ? Effect.succeed(child.program.output()) : Effect.fail(exitedWith(child, code))
  )

/** `work`, failing as soon as `child` exits instead of waiting for the phase's limit. */
const whileRunning = <A, E, R>(child: Child, work: Effect.Effect<A, E, R>) =>
  Effect.raceFirst(
    work,
    Effect.flatMap(child.program.exited, (code) => Effect.fail(exitedWith(child, code)))
  )

// --- Kafka ---

const kafkaCall = <A>(what: string, call: () => Promise<A>) =>
  Effect.tryPromise({
    try: call,
    catch: (cause) => new PhaseError({ message: `${what}: ${cause instanceof Error ? cause.message : String(cause)}` })
  })

/** An admin client for the life of the scope. */
const connectAdmin = (brokers: string) =>
  Effect.acquireRelease(
    Effect.gen(function* () {
      const kafka = new Kafka({
        clientId: "kafka-effect-demo",
        brokers: brokers.split(","),
        logLevel: logLevel.NOTHING
      })
      const admin = kafka.admin()
      yield* kafkaCall(`cannot connect to ${brokers}`, () => admin.connect())
      return { kafka, admin }
    }),
    ({ admin }) =>
      Effect.ignore(
        Effect.timeoutOption(
          kafkaCall("disconnect", () => admin.disconnect()),
          "5 seconds"
        )
      )
  )

/** Sum of a topic's end offsets, and of what `groupId` committed there. */
const progress = (admin: Admin, topic: string, groupId: string) =>
  kafkaCall(`the offsets of ${topic}`, async () => {
    const ends = await admin.fetchTopicOffsets(topic)
    const [committed] = await admin.fetchOffsets({ groupId, topics: [topic] })
    const end = ends.reduce((sum, p) => sum + Number(p.offset), 0)
    const done = (committed?.partitions ?? []).reduce((sum, p) => sum + Math.max(0, Number(p.offset)), 0)
    return { topic, end, done }
  })

const sum = (counts: Readonly<Record<string, number>>) => Object.values(counts).reduce((a, b) => a + b, 0)

// --- The phases ---

/** The broker in KAFKA_BROKERS, or a local one for the life of the scope. */
const broker = Effect.gen(function* () {
  const external = process.env.KAFKA_BROKERS
  if (external !== undefined && external !== "") {
    const client = yield* phase("broker", `using the broker in KAFKA_BROKERS: ${external}`, connectAdmin(external))
    return { brokers: external, ...client }
  }
  yield* phase("jars", "the Kafka broker's jars (Maven resolves them on the first run only)", Broker.resolveJars)
  return yield* phase(
    "broker",
    "starting a local Kafka broker",
    Effect.gen(function* () {
      // A free port and a fresh directory: no clash with another broker on this machine.
      const local = yield* Broker.acquire({})
      say(`started a local Kafka broker at ${local.brokers} (pid ${local.pid})`)
      yield* Effect.addFinalizer(() => Effect.sync(() => say(`stopping the local Kafka broker (pid ${local.pid})`)))
      return { brokers: local.brokers, ...(yield* connectAdmin(local.brokers)) }
    })
  )
})

/** What the phases share: the broker, an admin client, and the names and environment of this run's programs. */
interface Run {
  readonly kafka: Kafka
  readonly admin: Admin
  readonly topics: { readonly main: string; readonly retries: ReadonlyArray<string>; readonly dlq: string }
  readonly group: string
  readonly env: Record<string, string>
}

/** Names for this run, and the environment that configures both programs. */
const makeRun = (brokers: string, kafka: Kafka, admin: Admin): Run => {
  const stamp = `demo-${Date.now()}`
  const topics = { main: stamp, retries: [1, 2, 3].map((n) => `${stamp}-retry-${n}`), dlq: `${stamp}-dlq` }
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
  return { kafka, admin, topics, group, env }
}

/** The consumer program, once it created the topics (it joins its groups next). */
const startConsumer = (run: Run) =>
  phase(
    "consumer start",
    `the consumer program, until it created ${run.topics.main} and its retry topics and DLQ`,
    Effect.gen(function* () {
      const consumer = yield* spawnChild(
        "the consumer program",
        "consumer",
        ["--transient-failures", flags.transient, "--permanent-failures", flags.permanent],
        run.env
      )
      yield* whileRunning(
        consumer,
        kafkaCall("listing topics", () => run.admin.listTopics()).pipe(
          Effect.repeat({ schedule: Schedule.spaced("200 millis"), until: (names) => names.includes(run.topics.dlq) })
        )
      )
      say(`consumer running: ${run.topics.main} → ${run.topics.retries.join(", ")} → ${run.topics.dlq}`)
      return consumer
    })
  )

/** The producer program for `events` generated events; how many it sent. */
const produce = (run: Run, consumer: Child) =>
  phase(
    "produce",
    `the producer program, for ${events} events`,
    whileRunning(
      consumer,
      Effect.gen(function* () {
        const producer = yield* spawnChild(
          "the producer program",
          "producer",
          ["--generate", "--count", String(events), "--rate", "0"],
          run.env
        )
        const { stdout } = yield* exitedCleanly(producer)
        say(stdout.trim())
        const sent = Number(/summary: sent (\d+)/.exec(stdout)?.[1])
        if (Number.isNaN(sent)) return yield* new PhaseError({ message: "the producer program printed no summary" })
        return sent
      })
    )
  )

/** Five records as a careless producer might send them. */
const sendPoison = (run: Run, consumer: Child) => {
  const valid = { id: "x", source: "demo", timestamp: new Date().toISOString(), payload: {} }
  const messages = [
    { key: "poison-1", value: '{"id": "p1", "type": ' },
    { key: "poison-2", value: JSON.stringify({ ...valid, id: "p2", type: "order.created", timestamp: "yesterday" }) },
    { key: "poison-3", value: Buffer.from([0xff, 0xfe, 0x00, 0x41]) },
    { key: "poison-4", value: null },
    { key: "poison-5", value: JSON.stringify({ ...valid, id: "p5", type: "order.teleported" }) }
  ]
  return phase(
    "poison",
    "five records as a careless producer might send them",
    whileRunning(
      consumer,
      Effect.acquireUseRelease(
        Effect.sync(() => run.kafka.producer()),
        (poison) =>
          kafkaCall("connecting a producer", () => poison.connect()).pipe(
            Effect.andThen(
              kafkaCall("sending the poison records", () => poison.send({ topic: run.topics.main, messages }))
            )
          ),
        (poison) =>
          Effect.ignore(
            Effect.timeoutOption(
              kafkaCall("disconnect", () => poison.disconnect()),
              "5 seconds"
            )
          )
      ).pipe(
        Effect.andThen(
          Effect.sync(() =>
            say(
              "sent 5 poison records: invalid JSON, a schema violation, non-UTF-8 bytes, a null value, an unsupported type"
            )
          )
        )
      )
    )
  )
}

/**
 * Until every group has committed everything: nothing in flight, nothing waiting in a retry topic. Read in ladder
 * order: a hop is produced before its source is committed, so this cannot miss one. A failed look is only a look
 * (the next may succeed); a limit that passes says what the last one saw.
 */
const settle = (run: Run, consumer: Child, produced: number) => {
  let seen = "nothing read yet"
  const look = Effect.all([
    progress(run.admin, run.topics.main, run.group),
    ...run.topics.retries.map((topic, i) => progress(run.admin, topic, `${run.group}-retry-${i + 1}`))
  ]).pipe(
    Effect.map((stages) => {
      seen = `committed ${stages.map((stage) => `${stage.done}/${stage.end} in ${stage.topic}`).join(", ")}`
      return stages[0]?.end === produced && stages.every((stage) => stage.done === stage.end)
    }),
    Effect.catch((error: PhaseError) =>
      Effect.sync(() => {
        seen = error.message
        return false
      })
    )
  )
  return phase(
    "settle",
    "until every group has committed everything",
    whileRunning(
      consumer,
      look.pipe(Effect.repeat({ schedule: Schedule.spaced("500 millis"), until: (done) => done }))
    ),
    () => seen
  )
}

interface Stats {
  readonly done: number
  readonly retriedInPlace: number
  readonly retried: Record<string, number>
  readonly deadLettered: Record<string, number>
}

/** `pattern`'s JSON in what a program printed, or a `PhaseError` saying it is missing. */
const printedJson = <A>(stdout: string, pattern: RegExp, what: string) => {
  const json = pattern.exec(stdout)?.[1]
  return Effect.try({
    try: () => JSON.parse(json ?? "") as A,
    catch: () => new PhaseError({ message: `${what} printed no summary${json === undefined ? "" : `: ${json}`}` })
  })
}

/** SIGTERM to the consumer program, which shuts down gracefully and prints its summary. */
const stopConsumer = (consumer: Child) =>
  phase(
    "consumer stop",
    `SIGTERM to the consumer program (pid ${consumer.program.child.pid}), which then prints its summary`,
    Effect.gen(function* () {
      consumer.program.child.kill("SIGTERM")
      const { stdout } = yield* exitedCleanly(consumer)
      return yield* printedJson<Stats>(stdout, /summary: (.*)/, "the consumer program")
    })
  )

/** What `consumer.js replay --dry-run` would replay from the DLQ. */
const replay = (run: Run) =>
  phase(
    "replay",
    `consumer.js replay --dry-run on ${run.topics.dlq}`,
    Effect.gen(function* () {
      const replay = yield* spawnChild("the consumer program's replay", "consumer", ["replay", "--dry-run"], run.env)
      const { stdout } = yield* exitedCleanly(replay)
      return yield* printedJson<{ matched?: number; withoutValue?: number }>(
        stdout,
        /replay \(dry run\): (.*)/,
        "the replay"
      )
    })
  )

/** The counts, and checks that they add up. */
const report = (
  run: Run,
  sent: number,
  stats: Stats,
  replayable: { readonly matched?: number; readonly withoutValue?: number }
) =>
  phase(
    "report",
    "the counts, and whether they add up",
    Effect.gen(function* () {
      const produced = sent + 5
      const deadLettered = sum(stats.deadLettered)
      const retriedBy = run.topics.retries.map((topic) => stats.retried[topic] ?? 0)
      const lines = [
        ["produced", `${produced} (${sent} events from the producer program + 5 poison records)`],
        ["processed", `${stats.done} (after ${stats.retriedInPlace} in-place retries)`],
        [
          "retried",
          `${sum(stats.retried)} hops (${run.topics.retries.map((t, i) => `${t}: ${retriedBy[i]}`).join(", ")})`
        ],
        [
          "dead-lettered",
          `${deadLettered} (${Object.entries(stats.deadLettered)
            .map(([tag, n]) => `${tag}: ${n}`)
            .join(", ")})`
        ],
        [
          "replayable",
          `${replayable.matched ?? "?"} in ${run.topics.dlq}, and ${replayable.withoutValue ?? "?"} without a value ` +
            "left alone (node dist/consumer.js replay --dry-run)"
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
      if (checks.some(([, ok]) => !ok)) return yield* new PhaseError({ message: "the counts do not add up" })
    })
  )

const demo = Effect.gen(function* () {
  const { brokers, kafka, admin } = yield* broker
  const run = makeRun(brokers, kafka, admin)
  const consumer = yield* startConsumer(run)
  const sent = yield* produce(run, consumer)
  yield* sendPoison(run, consumer)
  yield* settle(run, consumer, sent + 5)
  const stats = yield* stopConsumer(consumer)
  const replayable = yield* replay(run)
  yield* report(run, sent, stats, replayable)
}).pipe(Effect.scoped)

// --- Running it: a signal interrupts the demo, whose scopes then stop what it started ---

// A closed stdout or stderr (`npm run demo | head`) would otherwise crash the demo before it stopped what it started.
process.stdout.on("error", () => undefined)
process.stderr.on("error", () => undefined)

const fiber = Effect.runFork(demo)
let stoppedBy: NodeJS.Signals | undefined
const onSignal = (signal: NodeJS.Signals) => {
  if (stoppedBy !== undefined) {
    say(`${signal}: already stopping what the demo started`)
    return
  }
  stoppedBy = signal
  say(`${signal}${current ? ` in phase ${current}` : ""}: stopping what the demo started`)
  Effect.runFork(Fiber.interrupt(fiber))
}
process.on("SIGINT", onSignal)
process.on("SIGTERM", onSignal)

const exit = await Effect.runPromise(Fiber.await(fiber))
const exitCode = (() => {
  if (Exit.isSuccess(exit)) return 0
  if (stoppedBy !== undefined && Cause.hasInterruptsOnly(exit.cause)) {
    say(`stopped by ${stoppedBy}`)
    return 128 + (Os.constants.signals[stoppedBy] ?? 0)
  }
  // A PhaseFailed was printed when it happened; anything else is a bug of the demo's.
  if (!(Cause.squash(exit.cause) instanceof PhaseFailed)) {
    process.stderr.write(`[demo] FAILED in phase ${current ?? "(none)"}: ${Cause.pretty(exit.cause)}\n`)
  }
  return 1
})()
process.exit(exitCode)
