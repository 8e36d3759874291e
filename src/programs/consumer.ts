/**
 * The consumer program (`node dist/consumer.js`).
 *
 * - `node dist/consumer.js [flags]`: runs the Processor on KAFKA_CONSUMER_TOPIC with the example handler (the Go
 *   example's message processor): each record is validated as an `Event` (a bad one is dead-lettered with the
 *   reason) and processed by its type; an unsupported type is a fatal failure. For demos, a share of the events
 *   can be made to fail: `--transient-failures R` fail on the main topic and succeed on the first retry topic;
 *   `--permanent-failures R` fail every time, climb the whole retry ladder and end in the DLQ. Which events fail
 *   is decided by their id, so a rerun fails the same ones. On exit (SIGINT/SIGTERM: graceful) it prints a summary.
 * - `node dist/consumer.js replay [flags]`: re-publishes dead letters to their original topic (`Replay`).
 *
 * Logs go to stderr, the summary to stdout.
 */
import { parseArgs } from "node:util"
import { Duration, Effect, Layer, Metric, Schedule } from "effect"
import * as Event from "../Event.ts"
import * as KafkaClient from "../KafkaClient.ts"
import * as KafkaConfig from "../KafkaConfig.ts"
import * as KafkaProducer from "../KafkaProducer.ts"
import * as Observability from "../Observability.ts"
import * as Processor from "../Processor.ts"
import * as Replay from "../Replay.ts"
import { environment } from "./help.ts"
import { boundShutdown, ProgramFailed, warnMisspelled, wholeFlag } from "./main.ts"

const usage = `usage: node dist/consumer.js [--transient-failures R] [--permanent-failures R] [--work-ms N]
       node dist/consumer.js replay [--error-tag TAG]… [--topic TOPIC]… [--since TIME] [--until TIME] [--max N] [--all-groups] [--dry-run]
  Processes KAFKA_CONSUMER_TOPIC with the example event handler; retries via KAFKA_RETRY_TOPIC_PREFIX-1…N, dead
  letters to KAFKA_DLQ_TOPIC. Configured by the KAFKA_* variables (see the README).
  --transient-failures R  share (0 to 1) of events that fail until their first retry (demo; default 0)
  --permanent-failures R  share (0 to 1) of events that always fail and end in the DLQ (demo; default 0)
  --work-ms N             simulated work per event, in milliseconds (default 0)
  replay                  re-publish this group's dead letters to their original topic; filters:
    --error-tag TAG       only this error tag (repeatable)
    --topic TOPIC         only records first produced to this topic (repeatable)
    --since TIME          only dead-lettered at or after TIME (ISO-8601, or epoch milliseconds: 13 digits)
    --until TIME          only dead-lettered before TIME
    --max N               at most N records
    --all-groups          also the dead letters of other consumer groups (a shared DLQ)
    --dry-run             count what would be replayed, send nothing
  -h, --help              this text
Exit codes: 0 stopped by a signal (or a replay done); 1 the member or a replay failed (a corrupt batch, a send that
failed for good); 2 a bad flag or variable, or topics missing.
Environment:
${environment()}`

type Options =
  | {
      readonly command: "run"
      readonly transientFailures: number
      readonly permanentFailures: number
      readonly workMs: number
    }
  | ({ readonly command: "replay" } & Omit<Replay.ReplayOptions, "dlqTopic" | "groupId">)

const parseOptions = (argv: ReadonlyArray<string>): Effect.Effect<Options, ProgramFailed> =>
  Effect.try({
    try: (): Options => {
      const { values, positionals } = parseArgs({
        args: [...argv],
        allowPositionals: true,
        options: {
          "transient-failures": { type: "string", default: "0" },
          "permanent-failures": { type: "string", default: "0" },
          "work-ms": { type: "string", default: "0" },
          "error-tag": { type: "string", multiple: true },
          topic: { type: "string", multiple: true },
          since: { type: "string" },
          until: { type: "string" },
          max: { type: "string" },
          "all-groups": { type: "boolean", default: false },
          "dry-run": { type: "boolean", default: false },
          help: { type: "boolean", short: "h", default: false }
        }
      })
      if (values.help) throw new Error("help")
      const share = (name: string, raw: string) => {
        const n = raw.trim() === "" ? Number.NaN : Number(raw)
        if (!(n >= 0 && n <= 1)) throw new Error(`--${name} must be a share from 0 to 1, got ${raw}`)
        return n
      }
      const whole = wholeFlag
      // A replay cannot be undone, so a time must say what it means: an ISO-8601 date or date-time, or epoch
      // milliseconds of 13 digits. Epoch seconds (10 digits) or a basic date such as 20261128, read as
      // milliseconds, would be days after 1970 and replay everything.
      const isoTime = /^\d{4}-\d{2}-\d{2}([T ]\d{2}:\d{2}(:\d{2}(\.\d{1,9})?)?(Z|[+-]\d{2}:?\d{2})?)?$/i
      const time = (name: string, raw: string | undefined) => {
        if (raw === undefined) return undefined
        const n = /^\d{13}$/.test(raw) ? Number(raw) : isoTime.test(raw) ? Date.parse(raw) : Number.NaN
        if (!Number.isFinite(n)) {
          throw new Error(
            `--${name} must be an ISO-8601 time (2026-11-28T10:00:00Z) or epoch milliseconds (13 digits), got ${JSON.stringify(raw)}`
          )
        }
        return n
      }
      const [command, ...rest] = positionals
      if (rest.length > 0 || (command !== undefined && command !== "replay")) {
        throw new Error(`unknown command ${positionals.join(" ")}`)
      }
      // A flag of the other command is a mistake, not something to ignore: `--dry-run` without `replay` would
      // otherwise start the processor for real.
      const given = (names: ReadonlyArray<keyof typeof values>) =>
        names.filter((name) => argv.some((arg) => arg === `--${name}` || arg.startsWith(`--${name}=`)))
      const misplaced =
        command === "replay"
          ? given(["transient-failures", "permanent-failures", "work-ms"])
          : given(["error-tag", "topic", "since", "until", "max", "all-groups", "dry-run"])
      if (misplaced.length > 0) {
        throw new Error(
          `${misplaced.map((name) => `--${name}`).join(", ")} ${misplaced.length === 1 ? "is" : "are"} not a flag of ${command === "replay" ? "replay" : "the processor (did you mean replay?)"}`
        )
      }
      if (command === "replay") {
        return {
          command: "replay",
          errorTags: values["error-tag"],
          originalTopics: values.topic,
          since: time("since", values.since),
          until: time("until", values.until),
          max: values.max === undefined ? undefined : whole("max", values.max, 1),
          allGroups: values["all-groups"],
          dryRun: values["dry-run"]
        }
      }
      return {
        command: "run",
        transientFailures: share("transient-failures", values["transient-failures"]),
        permanentFailures: share("permanent-failures", values["permanent-failures"]),
        workMs: whole("work-ms", values["work-ms"], 0)
      }
    },
    catch: (cause) =>
      new ProgramFailed({
        message: cause instanceof Error && cause.message !== "help" ? `${cause.message}\n${usage}` : usage,
        exitCode: cause instanceof Error && cause.message === "help" ? 0 : 2
      })
  })

/** A handler error that trying again may cure (a dependency is down). */
class DependencyUnavailable extends Error {
  readonly _tag = "DependencyUnavailable"
}

/** Where in [0, 1) an event falls, by its id: the same event always falls in the same place. */
const share = (id: string, salt: string) => {
  let hash = 0x811c9dc5
  for (const char of `${salt}:${id}`) hash = Math.imul(hash ^ (char.codePointAt(0) ?? 0), 0x01000193)
  return (hash >>> 0) / 2 ** 32
}

const supported = new Set(["order.created", "order.paid", "order.shipped", "user.signed_up", "payment.refunded"])

/** The example handler: the Go example's processor, validating and processing by type. */
const exampleHandler = (topic: string, options: Extract<Options, { command: "run" }>) =>
  Processor.handler({
    topic,
    value: Event.Event,
    handle: ({ value: event, attempt }) =>
      Effect.gen(function* () {
        if (!supported.has(event.type)) {
          return yield* new Processor.Fatal({ reason: `unsupported event type ${event.type}` })
        }
        if (share(event.id, "permanent") < options.permanentFailures) {
          return yield* Effect.fail(new DependencyUnavailable(`simulated permanent failure of ${event.id}`))
        }
        if (attempt === 0 && share(event.id, "transient") < options.transientFailures) {
          return yield* Effect.fail(new DependencyUnavailable(`simulated transient failure of ${event.id}`))
        }
        if (options.workMs > 0) yield* Effect.sleep(Duration.millis(options.workMs))
        yield* Effect.logDebug(`processed ${event.type}`).pipe(Effect.annotateLogs({ id: event.id, attempt }))
      })
  })

const sum = (counts: Readonly<Record<string, number>>) => Object.values(counts).reduce((a, b) => a + b, 0)

const describeStats = (stats: Processor.Stats) =>
  `done ${stats.done}, retried ${sum(stats.retried)}, dead-lettered ${sum(stats.deadLettered)}, ` +
  `in-place retries ${stats.retriedInPlace}`

const runProcessor = (options: Extract<Options, { command: "run" }>) =>
  Effect.gen(function* () {
    const config = yield* KafkaConfig.consumer
    const processor = yield* Processor.Processor
    // A live line on a terminal, a log line every 10 s otherwise: totals, rate since the last line, and lag.
    const tty = process.stderr.isTTY === true
    const every = tty ? Duration.seconds(1) : Duration.seconds(10)
    let lastDone = 0
    const progress = Effect.gen(function* () {
      const stats = yield* processor.stats
      const lag = (yield* Metric.snapshot)
        .filter((snapshot) => snapshot.id === "consumer_lag" && snapshot.type === "Gauge")
        .reduce((sum, snapshot) => sum + Number(snapshot.type === "Gauge" ? snapshot.state.value : 0), 0)
      const rate = Math.round((stats.done - lastDone) / Duration.toSeconds(every))
      lastDone = stats.done
      const line = `${describeStats(stats)} — ${rate} records/s, lag ${lag}`
      if (tty) process.stderr.write(`\r${line}   `)
      else yield* Effect.logInfo(`progress: ${line}`)
    })
    // The summary prints however the run ends (a signal included), after the consumers committed.
    const summary = Effect.flatMap(processor.stats, (stats) =>
      Effect.sync(() => {
        if (tty) process.stderr.write("\n")
        process.stdout.write(`summary: ${JSON.stringify(stats)}\n`)
      })
    )
    yield* Effect.forkScoped(Effect.repeat(progress, Schedule.spaced(every)).pipe(Effect.delay(every)))
    return yield* processor.run([exampleHandler(config.topic, options)]).pipe(Effect.ensuring(summary))
  }).pipe(Effect.scoped)

/**
 * The Processor's producer, for retry and dead-letter hops. Closing waits 2 s at most for what it still holds: a hop
 * the Processor still waits for belongs to a record whose handling shutdown cut off, which is not committed and is
 * handled again after a restart (sent now, it would only be sent twice).
 */
const producerLayer = Layer.effect(
  KafkaProducer.KafkaProducer,
  Effect.flatMap(KafkaConfig.producer, (config) =>
    KafkaProducer.make({ ...config, flushTimeout: Duration.min(config.flushTimeout, Duration.seconds(2)) })
  )
)

const runReplay = (options: Extract<Options, { command: "replay" }>) =>
  Effect.gen(function* () {
    const config = yield* KafkaConfig.consumer
    const summary = yield* Replay.replay({ ...options, dlqTopic: config.dlqTopic, groupId: config.groupId })
    process.stdout.write(`replay${options.dryRun ? " (dry run)" : ""}: ${JSON.stringify(summary)}\n`)
  })

export const main = (argv: ReadonlyArray<string>) =>
  Effect.gen(function* () {
    const options = yield* parseOptions(argv)
    const work: Effect.Effect<
      void,
      KafkaConfig.KafkaConfigError | KafkaProducer.ProduceError | Processor.TopicsMissing,
      KafkaClient.KafkaClient | KafkaProducer.KafkaProducer
    > =
      options.command === "replay"
        ? runReplay(options)
        : runProcessor(options).pipe(Effect.provide(Processor.layerConfig))
    // The flags (above) and every variable are checked before anything connects: a mistake stops start-up at
    // once (exit 2), whether a broker answers or not.
    const config = yield* KafkaConfig.all
    yield* warnMisspelled(process.env)
    // After a signal: the members' shutdown (the shutdown timeout, then 5 s at most for the last commits and 3 s to
    // leave the group), the producer (below), and a second for each client's disconnect.
    yield* boundShutdown(Duration.sum(config.consumer.shutdownTimeout, Duration.seconds(15)))
    yield* work.pipe(
      Effect.provide(producerLayer),
      Effect.provide(KafkaClient.layerConfig),
      // Logger, health, /metrics, OTLP: outside the client, so that connecting is logged and reported.
      Effect.provide(Observability.layerConfig)
    )
  }).pipe(
    Effect.catchTag("KafkaConfigError", (error) =>
      Effect.fail(new ProgramFailed({ message: error.message, exitCode: 2 }))
    ),
    Effect.catchTag("TopicsMissing", (error) =>
      Effect.fail(new ProgramFailed({ message: error.message, exitCode: 2 }))
    ),
    Effect.catchTag("KafkaError", (error) => Effect.fail(new ProgramFailed({ message: error.message, exitCode: 1 }))),
    Effect.catchTag("ProducerClosed", (error) =>
      Effect.fail(new ProgramFailed({ message: error.message, exitCode: 1 }))
    ),
    Effect.provide(Observability.layerLoggerConfig.pipe(Layer.catch(() => Layer.empty)))
  )
