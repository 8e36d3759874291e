/**
 * How our programs run: `NodeRuntime.runMain` with our exit codes.
 *
 * - SIGINT/SIGTERM interrupt the program; its scopes close (flush, commit, disconnect) and the process exits 0,
 *   since stopping on request is success — or with `process.exitCode` when the program set it: the producer
 *   program's verdict on its input (invalid lines, failed sends) holds however the run ended. A second signal
 *   while that runs exits at once with 128 + the signal's number (130 for SIGINT, 143 for SIGTERM). A program
 *   that has not stopped within its bound (`boundShutdown`) of the first signal exits with 1.
 * - A `ProgramFailed` exits with its code after printing its message, without a stack trace: it is an expected
 *   outcome (invalid input lines, say), not a crash.
 * - Anything else fails as Effect reports it, with exit code 1.
 */
import * as Os from "node:os"
import { NodeRuntime } from "@effect/platform-node"
import { Cause, Data, Duration, Effect, Exit, Runtime } from "effect"
import * as KafkaConfig from "../KafkaConfig.ts"

export class ProgramFailed extends Data.TaggedError("ProgramFailed")<{
  readonly message: string
  readonly exitCode: number
}> {}

/**
 * A flag's whole number, at least `min`; throws (for the programs' usage message) otherwise. Digits only: Number()
 * would take "" (an unset shell variable) as 0, "0x10" as 16 and "1e3" as 1000.
 */
export const wholeFlag = (name: string, raw: string, min: number): number => {
  const n = /^\d{1,15}$/.test(raw) ? Number(raw) : Number.NaN
  if (!(n >= min)) throw new Error(`--${name} must be a whole number ≥ ${min}, got ${JSON.stringify(raw)}`)
  return n
}

/** How long a program may take to stop once signalled, before `run` exits regardless (see `boundShutdown`). */
let shutdownBound = Duration.seconds(10)

/**
 * Sets how long the program may take to stop after a signal: its own bound (the producer's flush timeout, the
 * consumer's shutdown timeout) plus a margin. Past it, the process exits with code 1 whatever it is doing: the
 * program's own timeouts end every state we know of well before, and this is the guarantee for the ones we do not
 * (a stack overflow in a dependency, a promise that never settles). Until a program sets it: 10 s, for start-up.
 */
export const boundShutdown = (bound: Duration.Duration): Effect.Effect<void> =>
  Effect.sync(() => {
    shutdownBound = bound
  })

/** Levenshtein distance, for the variables that look misspelled. */
const distance = (a: string, b: string) => {
  let previous = Array.from({ length: b.length + 1 }, (_, j) => j)
  for (let i = 1; i <= a.length; i++) {
    const current = [i]
    for (let j = 1; j <= b.length; j++) {
      current[j] = Math.min(
        (previous[j] as number) + 1,
        (current[j - 1] as number) + 1,
        (previous[j - 1] as number) + (a[i - 1] === b[j - 1] ? 0 : 1)
      )
    }
    previous = current
  }
  return previous[b.length] as number
}

/**
 * Warns about environment variables that look like one of ours but are not (`KAFKA_BROKER` for `KAFKA_BROKERS`):
 * silently ignored, they would leave a default in force.
 */
export const warnMisspelled = (env: NodeJS.ProcessEnv): Effect.Effect<void> =>
  Effect.forEach(
    Object.keys(env).filter((name) => /^(KAFKA|LOG|METRICS|OTEL)_/.test(name) && !known.has(name)),
    (name) => {
      const near = KafkaConfig.variables.find((variable) => distance(name, variable) <= 2)
      return near === undefined
        ? Effect.void
        : Effect.logWarning(`${name} is not a variable kafka-effect reads; did you mean ${near}? (it is ignored)`)
    },
    { discard: true }
  )
const known = new Set<string>(KafkaConfig.variables)

/**
 * kafkajs 2.2.4 schedules a timer with a negative delay when it has no request pending, and Node (≥ 23) warns about
 * it once per process; Node clamps it to 1 ms, as kafkajs meant. The programs print every other warning.
 */
const quietKafkajsTimers = () => {
  const printers = process.listeners("warning")
  process.removeAllListeners("warning")
  process.on("warning", (warning) => {
    if (warning.name === "TimeoutNegativeWarning") return
    for (const print of printers) print(warning)
  })
}

export const run = <E>(program: Effect.Effect<void, E>): void => {
  quietKafkajsTimers()
  let signals = 0
  const onSignal = (signal: NodeJS.Signals) => {
    signals++
    if (signals >= 2) {
      process.stderr.write("second signal: exiting now without waiting for shutdown\n")
      process.exit(128 + (Os.constants.signals[signal] ?? 2))
    }
    // A plain timer, not an Effect: it must fire even if the program's fibers cannot run. unref'd, it does not keep
    // a process that has finished alive.
    const seconds = Duration.toSeconds(shutdownBound)
    setTimeout(() => {
      process.stderr.write(
        `did not stop within ${seconds} s of ${signal}: exiting now, with what was unfinished lost\n`
      )
      process.exit(1)
    }, Duration.toMillis(shutdownBound)).unref()
  }
  process.on("SIGINT", onSignal)
  process.on("SIGTERM", onSignal)
  NodeRuntime.runMain(program, {
    disableErrorReporting: true,
    teardown: (exit, onExit) => {
      if (Exit.isSuccess(exit) || Cause.hasInterruptsOnly(exit.cause)) {
        return onExit(typeof process.exitCode === "number" ? process.exitCode : 0)
      }
      const failed = Cause.squash(exit.cause)
      if (failed instanceof ProgramFailed) {
        // Exit code 0 is `--help`: what was asked for, on stdout (so that `| less` shows it).
        ;(failed.exitCode === 0 ? process.stdout : process.stderr).write(`${failed.message}\n`)
        return onExit(failed.exitCode)
      }
      process.stderr.write(`${Cause.pretty(exit.cause)}\n`)
      return Runtime.defaultTeardown(exit, onExit)
    }
  })
}
