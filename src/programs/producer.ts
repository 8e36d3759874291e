/**
 * The producer program (`node dist/producer.js`).
 *
 * - stdin is a pipe or a file: each line is an Event as JSON (NDJSON). Valid lines are sent; an invalid line is
 *   reported on stderr with its line number and reason, skipped, and makes the exit code 1 at the end.
 * - otherwise (a terminal, /dev/null, or `--generate`): sends generated sample events, `--count` of them (0: until
 *   stopped) at `--rate` per second (0: as fast as the broker takes them).
 *
 * Progress goes to stderr (a live line on a terminal, a log line every 5 s otherwise); the summary (sent,
 * invalid, failed, msgs/s) goes to stdout. SIGINT/SIGTERM stop reading (or generating); the sends already started
 * finish — acked or failed, each counted — and the exit code is 0 unless a line was invalid or a send failed.
 */
import * as Fs from "node:fs"
import { parseArgs } from "node:util"
import {
  Cause,
  Deferred,
  Duration,
  Effect,
  Exit,
  Fiber,
  Layer,
  Option,
  Ref,
  Schedule,
  type Schema,
  Scope,
  Stream
} from "effect"
import * as Event from "../Event.ts"
import * as KafkaClient from "../KafkaClient.ts"
import * as KafkaConfig from "../KafkaConfig.ts"
import * as KafkaProducer from "../KafkaProducer.ts"
import * as Observability from "../Observability.ts"
import { environment } from "./help.ts"
import { boundShutdown, ProgramFailed, warnMisspelled, wholeFlag } from "./main.ts"

const usage = `usage: node dist/producer.js [--generate] [--count N] [--rate N] [--subjects N] [--source NAME] [--create-topic [--partitions N]]
  NDJSON events on stdin are validated and sent to KAFKA_PRODUCER_TOPIC; without stdin, sample events are generated.
  --generate        generate sample events even when stdin is a pipe
  --count N         how many to generate (default 1000; 0 = until stopped)
  --rate N          events per second to generate (default 100; 0 = as fast as possible)
  --subjects N      distinct subjects (Kafka keys) of generated events (default 100)
  --source NAME     the source field of generated events (default kafka-effect-producer)
  --create-topic    create KAFKA_PRODUCER_TOPIC first if it does not exist
  --partitions N    its partitions (default 6)
  -h, --help        this text
Exit codes: 0 every event sent; 1 an invalid line, or a send failed or unacknowledged; 2 a bad flag or variable,
or a topic that does not exist.
Environment:
${environment()}`

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
          help: { type: "boolean", short: "h", default: false }
        }
      })
      if (values.help) throw new Error("help")
      const whole = wholeFlag
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
  /** sends begun (each ends acked, failed, or unfinished when the program stops) */
  readonly started: number
  readonly sent: number
  readonly invalid: number
  readonly failed: number
}

const describeSchemaError = (error: Schema.SchemaError) => error.message.replace(/\s+/g, " ").trim()

/**
 * How many events tick `tick` (from 0) of 100 ms sends at `rate` per second: floor(rate·(k+1)/10) − floor(rate·k/10),
 * so any rate comes out exact over each second (3/s sends 0,0,0,1,0,0,1,0,0,1), not rounded to a multiple of 10.
 */
export const dueInTick = (rate: number, tick: number) =>
  Math.floor((rate * (tick + 1)) / 10) - Math.floor((rate * tick) / 10)

/** A line of input (numbered from 1): its text, or why it has none. */
type Line = { readonly number: number; readonly text: string } | { readonly number: number; readonly invalid: string }

/**
 * The lines of `input`, ended by \n or \r\n, each decoded as strict UTF-8 (a byte-order mark dropped): a line that
 * is not UTF-8 is reported as such rather than sent with replacement characters (readline's decoding would turn
 * two different non-UTF-8 subjects into one key).
 */
export async function* lines(input: AsyncIterable<Uint8Array>): AsyncGenerator<Line> {
  const utf8 = new TextDecoder("utf-8", { fatal: true })
  let parts: Array<Uint8Array> = []
  let number = 0
  const line = (): Line => {
    number++
    let bytes = parts.length === 1 ? (parts[0] as Uint8Array) : Buffer.concat(parts)
    parts = []
    if (bytes[bytes.length - 1] === 13) bytes = bytes.subarray(0, bytes.length - 1)
    try {
      return { number, text: utf8.decode(bytes) }
    } catch {
      return { number, invalid: "not valid UTF-8" }
    }
  }
  for await (const chunk of input) {
    let start = 0
    for (let end = chunk.indexOf(10); end !== -1; end = chunk.indexOf(10, start)) {
      parts.push(chunk.subarray(start, end))
      start = end + 1
      yield line()
    }
    if (start < chunk.length) parts.push(chunk.subarray(start))
  }
  if (parts.length > 0) yield line()
}

export const main = (argv: ReadonlyArray<string>) =>
  Effect.gen(function* () {
    // The flags and every variable are checked before anything connects: a mistake stops start-up at once
    // (exit 2), whether a broker answers or not.
    const options = yield* parseOptions(argv)
    yield* KafkaConfig.all
    yield* warnMisspelled(process.env)
    yield* produce(options).pipe(
      Effect.provide(KafkaClient.layerConfig),
      // Logger, health, /metrics, OTLP: outside the client, so that connecting is logged and reported.
      Effect.provide(Observability.layerConfig)
    )
  }).pipe(
    Effect.catchTag("KafkaConfigError", (error) =>
      Effect.fail(new ProgramFailed({ message: error.message, exitCode: 2 }))
    ),
    Effect.catchTag("KafkaError", (error) => Effect.fail(new ProgramFailed({ message: error.message, exitCode: 1 }))),
    Effect.provide(Observability.layerLoggerConfig.pipe(Layer.catch(() => Layer.empty)))
  )

const produce = (options: Options) =>
  Effect.gen(function* () {
    const producerConfig = yield* KafkaConfig.producer
    // Closing takes the flush timeout at most, then a second for each client's disconnect (see engines/kafkajs/KafkaJS.ts).
    yield* boundShutdown(Duration.sum(producerConfig.flushTimeout, Duration.seconds(5)))
    const tally = yield* Ref.make<Tally>({ started: 0, sent: 0, invalid: 0, failed: 0 })
    const startedAt = performance.now()
    const elapsed = () => (performance.now() - startedAt) / 1000
    const rate = (sent: number) => Math.round(sent / Math.max(elapsed(), 0.001))

    // A send once begun is not interrupted: it ends acked or failed, and is counted, once the producer closes at the
    // latest (closing fails what it could not flush with ProducerClosed, within the flush timeout).
    const send = (event: Event.Event) =>
      Ref.update(tally, (t) => ({ ...t, started: t.started + 1 })).pipe(
        Effect.andThen(Event.encode(event)),
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
              // Those the closing producer refused are counted in the summary, not logged one by one.
              Effect.andThen(
                error._tag === "ProducerClosed"
                  ? Effect.void
                  : Effect.logError(`send failed: ${error.message}`).pipe(Effect.annotateLogs({ id: event.id }))
              )
            )
        }),
        Effect.uninterruptible
      )

    const invalidLine = (number: number, reason: string) =>
      Ref.update(tally, (t) => ({ ...t, invalid: t.invalid + 1 })).pipe(
        Effect.andThen(Effect.sync(() => process.stderr.write(`line ${number}: invalid event: ${reason}\n`))),
        Effect.as(undefined)
      )

    // Reading stops when `stop` completes, at once even while waiting for a line; the sends already started go on.
    const fromStdin = (stop: Effect.Effect<void>) =>
      Stream.fromAsyncIterable(
        lines(process.stdin),
        (cause) => new ProgramFailed({ message: `reading stdin failed: ${String(cause)}`, exitCode: 1 })
      ).pipe(
        Stream.interruptWhen(stop),
        // A line being read when reading stops is not waited for: stdin is closed, which ends the reader.
        Stream.ensuring(Effect.sync(() => process.stdin.destroy())),
        Stream.filter((line) => !("text" in line) || line.text.trim() !== ""),
        Stream.mapEffect(
          (line) =>
            "invalid" in line
              ? invalidLine(line.number, line.invalid)
              : Event.decode(line.text).pipe(
                  Effect.matchEffect({
                    onSuccess: (event) => Effect.succeed<Event.Event | undefined>(event),
                    onFailure: (error) => invalidLine(line.number, describeSchemaError(error))
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

    // A tick's sends run to their end once started; `stop` ends the ticking between two ticks.
    const generated = (stop: Effect.Effect<void>) =>
      Effect.gen(function* () {
        const tick = Duration.millis(100)
        const maxTick = producerConfig.batchSize * 4
        let ticks = 0
        let generatedSoFar = 0
        const oneTick = Effect.suspend(() => {
          const due = options.rate === 0 ? maxTick : dueInTick(options.rate, ticks)
          const n = options.count === 0 ? due : Math.min(due, options.count - generatedSoFar)
          const first = generatedSoFar
          ticks++
          generatedSoFar += n
          return Effect.forEach(
            Array.from({ length: n }, (_, i) => first + i),
            (i) =>
              Effect.flatMap(Event.sample({ source: options.source, subjects: options.subjects, sequence: i }), send),
            { concurrency: "unbounded", discard: true }
          ).pipe(Effect.as(options.count === 0 || generatedSoFar < options.count))
        })
        yield* Effect.raceFirst(
          Effect.repeat(Effect.uninterruptible(oneTick), {
            schedule: options.rate === 0 ? Schedule.forever : Schedule.fixed(tick),
            while: (more) => more
          }),
          stop
        )
      })

    const progressLine = Effect.gen(function* () {
      const t = yield* Ref.get(tally)
      return `sent ${t.sent}, invalid ${t.invalid}, failed ${t.failed} — ${rate(t.sent)} msgs/s`
    })
    const tty = process.stderr.isTTY === true
    const progress = tty
      ? Effect.flatMap(progressLine, (line) => Effect.sync(() => process.stderr.write(`\r${line}   `)))
      : Effect.flatMap(progressLine, (line) => Effect.logInfo(`progress: ${line}`))
    // Sends still unfinished when the program stops (a producer that did not close in time) count as failed.
    const summary = Effect.gen(function* () {
      const t = yield* Ref.get(tally)
      const unfinished = t.started - t.sent - t.failed
      const failed = t.failed + unfinished
      if (tty) process.stderr.write("\n")
      process.stdout.write(
        `summary: sent ${t.sent}, invalid ${t.invalid}, failed ${failed} in ${elapsed().toFixed(2)} s (${rate(t.sent)} msgs/s)\n`
      )
      if (t.invalid > 0 || failed > 0) {
        const unacked = unfinished > 0 ? ` (${unfinished} of them unfinished when the program stopped)` : ""
        process.stderr.write(`${t.invalid} invalid line(s) and ${failed} failed send(s)${unacked}\n`)
        process.exitCode = 1
      }
    })

    const client = yield* KafkaClient.KafkaClient
    if (options.createTopic) {
      const created = yield* client.admin.createTopics([
        { topic: producerConfig.topic, partitions: options.partitions }
      ])
      if (created.length > 0)
        yield* Effect.logInfo(`created topic ${producerConfig.topic} with ${options.partitions} partitions`)
    } else {
      // Said once, before any event: sent to a topic that does not exist, each event would fail on its own.
      const partitions = yield* client.admin.partitionCount(producerConfig.topic).pipe(
        Effect.catchIf(
          (error) => error.reason._tag === "UnknownTopic",
          () => Effect.succeed(0)
        )
      )
      if (partitions === 0) {
        return yield* new ProgramFailed({
          message: `topic ${producerConfig.topic} does not exist (KAFKA_PRODUCER_TOPIC); create it, or pass --create-topic`,
          exitCode: 2
        })
      }
    }
    const mode = !options.generate && stdinHasData() ? "stdin" : "generate"
    yield* Effect.logInfo(
      mode === "stdin"
        ? `reading NDJSON events from stdin for ${producerConfig.topic}`
        : `generating ${options.count === 0 ? "unbounded" : options.count} events at ${options.rate === 0 ? "max" : options.rate}/s for ${producerConfig.topic}`
    )
    // A signal interrupts this fiber. Reading (or generating) then stops, and the producer closes at once: what
    // lingers leaves, and within the flush timeout every send begun ends acked or failed (ProducerClosed), and is
    // counted, so the summary and the exit code tell what happened to every event read. The producer is built in
    // a scope of its own so that it can close before the sends are waited for: they wait on it.
    const work = Effect.scoped(
      Effect.gen(function* () {
        yield* Effect.forkScoped(
          Effect.repeat(progress, Schedule.spaced(tty ? "1 second" : "5 seconds")).pipe(
            Effect.delay(tty ? "1 second" : "5 seconds")
          )
        )
        const producerScope = yield* Scope.fork(yield* Effect.scope)
        const producer = yield* Layer.buildWithScope(KafkaProducer.layerConfig, producerScope)
        const stopping = yield* Deferred.make<void>()
        const stop = Deferred.await(stopping)
        yield* Effect.uninterruptibleMask((restore) =>
          Effect.gen(function* () {
            const producing = yield* Effect.forkChild(
              Effect.interruptible(mode === "stdin" ? fromStdin(stop) : generated(stop)).pipe(
                Effect.provideContext(producer)
              )
            )
            let exit = yield* Effect.exit(restore(Fiber.join(producing)))
            if (Exit.isFailure(exit) && Cause.hasInterrupts(exit.cause)) {
              yield* Deferred.succeed(stopping, undefined)
              yield* Scope.close(producerScope, Exit.void)
              // Every send has its outcome now, or is stuck for a reason of its own: not waited for beyond a second;
              // the summary counts it as failed.
              exit = Option.getOrElse(yield* Effect.timeoutOption(Fiber.await(producing), "1 second"), () => exit)
            }
            // The verdict is the exit code, set by the summary rather than failed: once a signal has interrupted the
            // program, a failure is dropped by the first error handler it passes (Effect gives an interrupted
            // fiber's handlers no say), and invalid lines or failed sends would exit 0.
            yield* Effect.ignore(summary)
            return yield* exit
          })
        )
      })
    )
    yield* work
  })
