/**
 * The producer program (`node dist/producer.js`).
 *
 * - stdin is a pipe or a file: each line is an Event as JSON (NDJSON). Valid lines are sent; an invalid line is
 *   reported on stderr with its line number and reason, skipped, and makes the exit code 1 at the end.
 * - otherwise (a terminal, /dev/null, or `--generate`): sends generated sample events, `--count` of them (0: until
 *   stopped) at `--rate` per second (0: as fast as the broker takes them).
 *
 * Progress goes to stderr (a live line on a terminal, a log line every 5 s otherwise); the summary (sent,
 * invalid, failed, msgs/s) goes to stdout. SIGINT/SIGTERM stop reading, flush what is pending and exit 0.
 */
import * as Fs from "node:fs"
import * as Readline from "node:readline"
import { parseArgs } from "node:util"
import { Duration, Effect, Layer, Ref, Schedule, type Schema, Stream } from "effect"
import * as KafkaConfig from "../Config.ts"
import * as Event from "../Event.ts"
import * as KafkaClient from "../KafkaClient.ts"
import * as KafkaProducer from "../KafkaProducer.ts"
import * as Observability from "../Observability.ts"
import { ProgramFailed } from "./main.ts"

const usage = `usage: node dist/producer.js [--generate] [--count N] [--rate N] [--subjects N] [--source NAME]
  NDJSON events on stdin are validated and sent; without stdin, sample events are generated.
  --generate      generate sample events even when stdin is a pipe
  --count N       how many to generate (default 1000; 0 = until stopped)
  --rate N        events per second to generate (default 100; 0 = as fast as possible)
  --subjects N    distinct subjects (Kafka keys) of generated events (default 100)
  --source NAME   the source field of generated events (default kafka-effect-producer)
  --create-topic  create KAFKA_PRODUCER_TOPIC first if it does not exist, with --partitions N (default 6)`

interface Options {
  readonly generate: boolean
  readonly count: number
  readonly rate: number
  readonly subjects: number
  readonly source: string
  readonly createTopic: boolean
  readonly partitions: number
}

const parseOptions = (argv: ReadonlyArray<string>): Effect.Effect<Options, ProgramFailed> =>
  Effect.try({
    try: () => {
      const { values } = parseArgs({
        args: [...argv],
        options: {
          generate: { type: "boolean", default: false },
          count: { type: "string", default: "1000" },
          rate: { type: "string", default: "100" },
          subjects: { type: "string", default: "100" },
          source: { type: "string", default: "kafka-effect-producer" },
          "create-topic": { type: "boolean", default: false },
          partitions: { type: "string", default: "6" },
          help: { type: "boolean", default: false }
        }
      })
      if (values.help) throw new Error("help")
      const whole = (name: string, raw: string, min: number) => {
        const n = Number(raw)
        if (!Number.isInteger(n) || n < min) throw new Error(`--${name} must be a whole number ≥ ${min}, got ${raw}`)
        return n
      }
      return {
        generate: values.generate,
        count: whole("count", values.count, 0),
        rate: whole("rate", values.rate, 0),
        subjects: whole("subjects", values.subjects, 1),
        source: values.source,
        createTopic: values["create-topic"],
        partitions: whole("partitions", values.partitions, 1)
      }
    },
    catch: (cause) =>
      new ProgramFailed({
        message: cause instanceof Error && cause.message !== "help" ? `${cause.message}\n${usage}` : usage,
        exitCode: cause instanceof Error && cause.message === "help" ? 0 : 2
      })
  })

/** stdin carries data when it is a pipe or a file; a terminal or /dev/null (a character device) does not. */
const stdinHasData = () => {
  try {
    const stat = Fs.fstatSync(0)
    return stat.isFIFO() || stat.isFile() || stat.isSocket()
  } catch {
    return false
  }
}

interface Tally {
  readonly sent: number
  readonly invalid: number
  readonly failed: number
}

const describeSchemaError = (error: Schema.SchemaError) => error.message.replace(/\s+/g, " ").trim()

export const main = (argv: ReadonlyArray<string>) =>
  Effect.gen(function* () {
    // The flags and every variable are checked before anything connects: a mistake stops start-up at once
    // (exit 2), whether a broker answers or not.
    const options = yield* parseOptions(argv)
    yield* KafkaConfig.all
    yield* produce(options).pipe(Effect.provide(KafkaClient.layerConfig))
  }).pipe(
    // Logger, health, /metrics, OTLP: outside the client, so that connecting is logged and reported.
    Effect.provide(Observability.layerConfig),
    Effect.catchTag("KafkaConfigError", (error) =>
      Effect.fail(new ProgramFailed({ message: error.message, exitCode: 2 }))
    ),
    Effect.catchTag("KafkaError", (error) => Effect.fail(new ProgramFailed({ message: error.message, exitCode: 1 }))),
    Effect.provide(Observability.layerLoggerConfig.pipe(Layer.catch(() => Layer.empty)))
  )

const produce = (options: Options) =>
  Effect.gen(function* () {
    const producerConfig = yield* KafkaConfig.producer
    const tally = yield* Ref.make<Tally>({ sent: 0, invalid: 0, failed: 0 })
    const startedAt = performance.now()
    const elapsed = () => (performance.now() - startedAt) / 1000
    const rate = (sent: number) => Math.round(sent / Math.max(elapsed(), 0.001))

    const send = (event: Event.Event) =>
      Event.encode(event).pipe(
        Effect.flatMap((value) =>
          // The span's trace context travels in the record's traceparent header to the processor's span.
          KafkaProducer.send({ key: Event.keyOf(event), value }).pipe(
            Effect.withSpan("send event", { kind: "producer", attributes: { "event.id": event.id } })
          )
        ),
        Effect.matchEffect({
          onSuccess: () => Ref.update(tally, (t) => ({ ...t, sent: t.sent + 1 })),
          onFailure: (error) =>
            Ref.update(tally, (t) => ({ ...t, failed: t.failed + 1 })).pipe(
              Effect.andThen(
                Effect.logError(`send failed: ${error.message}`).pipe(Effect.annotateLogs({ id: event.id }))
              )
            )
        })
      )

    // The reader is made only when the stream runs: readline reads at once, and lines it emits before the
    // iterator exists are lost.
    const fromStdin = Stream.suspend(() =>
      Stream.fromAsyncIterable(
        Readline.createInterface({ input: process.stdin, crlfDelay: Number.POSITIVE_INFINITY }),
        (cause) => new ProgramFailed({ message: `reading stdin failed: ${String(cause)}`, exitCode: 1 })
      )
    ).pipe(
      Stream.zipWithIndex,
      Stream.filter(([line]) => line.trim() !== ""),
      Stream.mapEffect(
        ([line, index]) =>
          Event.decode(line).pipe(
            Effect.matchEffect({
              onSuccess: (event) => Effect.succeed<Event.Event | undefined>(event),
              onFailure: (error) =>
                Ref.update(tally, (t) => ({ ...t, invalid: t.invalid + 1 })).pipe(
                  Effect.andThen(
                    Effect.sync(() =>
                      process.stderr.write(`line ${index + 1}: invalid event: ${describeSchemaError(error)}\n`)
                    )
                  ),
                  Effect.as(undefined)
                )
            })
          ),
        { concurrency: 1 }
      ),
      Stream.filter((event): event is Event.Event => event !== undefined),
      // Many sends in flight, so the producer can batch them. Their fibers start, and so enqueue, in line order
      // (forks and queue offers are FIFO), and the producer keeps that order per partition.
      Stream.mapEffect(send, { concurrency: producerConfig.batchSize * 2 }),
      Stream.runDrain
    )

    const generated = Effect.gen(function* () {
      const sequence = yield* Ref.make(0)
      const tick = Duration.millis(100)
      const perTick = options.rate === 0 ? producerConfig.batchSize * 4 : Math.max(1, Math.round(options.rate / 10))
      const left = Ref.get(sequence).pipe(
        Effect.map((n) => (options.count === 0 ? perTick : Math.min(perTick, options.count - n)))
      )
      const oneTick = Effect.gen(function* () {
        const n = yield* left
        const first = yield* Ref.getAndUpdate(sequence, (s) => s + n)
        yield* Effect.forEach(
          Array.from({ length: n }, (_, i) => first + i),
          (i) =>
            Effect.flatMap(Event.sample({ source: options.source, subjects: options.subjects, sequence: i }), send),
          { concurrency: "unbounded", discard: true }
        )
        return yield* left
      })
      yield* Effect.repeat(oneTick, {
        schedule: options.rate === 0 ? Schedule.forever : Schedule.fixed(tick),
        until: (remaining) => remaining <= 0
      })
    })

    const progressLine = Effect.gen(function* () {
      const t = yield* Ref.get(tally)
      return `sent ${t.sent}, invalid ${t.invalid}, failed ${t.failed} — ${rate(t.sent)} msgs/s`
    })
    const tty = process.stderr.isTTY === true
    const progress = tty
      ? Effect.flatMap(progressLine, (line) => Effect.sync(() => process.stderr.write(`\r${line}   `)))
      : Effect.flatMap(progressLine, (line) => Effect.logInfo(`progress: ${line}`))
    const summary = Effect.gen(function* () {
      const t = yield* Ref.get(tally)
      if (tty) process.stderr.write("\n")
      process.stdout.write(
        `summary: sent ${t.sent}, invalid ${t.invalid}, failed ${t.failed} in ${elapsed().toFixed(2)} s (${rate(t.sent)} msgs/s)\n`
      )
      return t
    })

    if (options.createTopic) {
      const client = yield* KafkaClient.KafkaClient
      const created = yield* client.admin.createTopics([
        { topic: producerConfig.topic, partitions: options.partitions }
      ])
      if (created.length > 0)
        yield* Effect.logInfo(`created topic ${producerConfig.topic} with ${options.partitions} partitions`)
    }
    const mode = !options.generate && stdinHasData() ? "stdin" : "generate"
    yield* Effect.logInfo(
      mode === "stdin"
        ? `reading NDJSON events from stdin for ${producerConfig.topic}`
        : `generating ${options.count === 0 ? "unbounded" : options.count} events at ${options.rate === 0 ? "max" : options.rate}/s for ${producerConfig.topic}`
    )
    const work = Effect.scoped(
      Effect.gen(function* () {
        yield* Effect.forkScoped(
          Effect.repeat(progress, Schedule.spaced(tty ? "1 second" : "5 seconds")).pipe(
            Effect.delay(tty ? "1 second" : "5 seconds")
          )
        )
        yield* mode === "stdin" ? fromStdin : generated
      })
    )
    // The summary prints however the work ends, interrupted by a signal included, after the producer flushed.
    const t = yield* work.pipe(
      Effect.provide(KafkaProducer.layerConfig),
      Effect.ensuring(Effect.ignore(summary)),
      Effect.andThen(Ref.get(tally))
    )
    if (t.invalid > 0 || t.failed > 0) {
      return yield* new ProgramFailed({
        message: `${t.invalid} invalid line(s) and ${t.failed} failed send(s)`,
        exitCode: 1
      })
    }
  })
