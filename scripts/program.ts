/**
 * Our programs as users run them: separate Node processes (a .ts from src/ runs with type stripping, no build),
 * configured by `env` alone (plus PATH). Output is collected as it comes; `onStderr` sees it too.
 */
import { type ChildProcess, spawn } from "node:child_process"
import * as Path from "node:path"
import { Effect, Schedule } from "effect"

export const root = Path.join(import.meta.dirname, "..")
export const consumerProgram = Path.join(root, "src", "consumer.ts")

/**
 * What a program started by a test keeps of the test's environment: PATH, and Node's compile cache when the run
 * has one (`npm test` sets it: each program would compile effect and the engines afresh otherwise).
 */
export const inherited = (): Record<string, string> => ({
  PATH: process.env.PATH ?? "",
  ...(process.env.NODE_COMPILE_CACHE !== undefined && { NODE_COMPILE_CACHE: process.env.NODE_COMPILE_CACHE })
})

export interface Program {
  readonly child: ChildProcess
  /** the exit code (null when killed by a signal), once the process closed */
  readonly exited: Effect.Effect<number | null>
  readonly output: () => { readonly stdout: string; readonly stderr: string }
}

export const start = (
  script: string,
  options: {
    readonly args?: ReadonlyArray<string> | undefined
    readonly env: Record<string, string>
    readonly onStderr?: ((chunk: string) => void) | undefined
    /** written to the program's stdin, which is then closed (unless `keepStdinOpen`); without it /dev/null */
    readonly stdin?: string | undefined
    readonly keepStdinOpen?: boolean | undefined
  }
): Program => {
  const child = spawn(
    process.execPath,
    ["--experimental-strip-types", "--no-warnings", script, ...(options.args ?? [])],
    {
      // The engine of the test run (KAFKA_CLIENT), unless `env` names one.
      env: {
        ...inherited(),
        ...(process.env.KAFKA_CLIENT !== undefined && { KAFKA_CLIENT: process.env.KAFKA_CLIENT }),
        ...options.env
      },
      stdio: [options.stdin === undefined ? "ignore" : "pipe", "pipe", "pipe"]
    }
  )
  // A program that exits without reading all of it breaks the pipe: that is its business, not a crash of ours.
  child.stdin?.on("error", () => {})
  if (options.stdin !== undefined) {
    if (options.keepStdinOpen) child.stdin?.write(options.stdin)
    else child.stdin?.end(options.stdin)
  }
  let stdout = ""
  let stderr = ""
  child.stdout?.on("data", (chunk) => {
    stdout += chunk
  })
  child.stderr?.on("data", (chunk) => {
    stderr += chunk
    options.onStderr?.(String(chunk))
  })
  const exited = Effect.callback<number | null>((resume) => {
    if (child.exitCode !== null || child.signalCode !== null) return resume(Effect.succeed(child.exitCode))
    child.on("close", (code) => resume(Effect.succeed(code)))
  })
  return { child, exited, output: () => ({ stdout, stderr }) }
}

/** How a program run ended: its exit code (null when killed by a signal) and all it printed. */
export interface Run {
  readonly exitCode: number | null
  readonly stdout: string
  readonly stderr: string
}

/**
 * Runs a program to its end, as `start` does; `onStderr` sees stderr so far as it comes (to signal the process at
 * the right moment). The process is killed if the caller is interrupted, and, with `stallTimeout`, once it has
 * printed nothing for that many ms (for a long run that reports its progress: bounded by its progress, not by the
 * machine's speed); otherwise if it outlives `timeout` ms (default 60 s).
 */
export const run = (
  script: string,
  options: {
    readonly args?: ReadonlyArray<string> | undefined
    readonly env: Record<string, string>
    readonly stdin?: string | undefined
    readonly keepStdinOpen?: boolean | undefined
    readonly onStderr?: ((soFar: string, program: Program) => void) | undefined
    readonly timeout?: number | undefined
    readonly stallTimeout?: number | undefined
  }
): Effect.Effect<Run> =>
  Effect.suspend(() => {
    let soFar = ""
    let printedAt = Date.now()
    const program: Program = start(script, {
      args: options.args,
      env: options.env,
      stdin: options.stdin,
      keepStdinOpen: options.keepStdinOpen,
      onStderr: (chunk) => {
        printedAt = Date.now()
        soFar += chunk
        options.onStderr?.(soFar, program)
      }
    })
    program.child.stdout?.on("data", () => {
      printedAt = Date.now()
    })
    const { stallTimeout } = options
    const bound =
      stallTimeout === undefined
        ? Effect.sleep(options.timeout ?? 60_000)
        : Effect.sync(() => Date.now() - printedAt >= stallTimeout).pipe(
            Effect.repeat({ schedule: Schedule.spaced("1 second"), until: (stalled) => stalled })
          )
    return Effect.raceFirst(
      program.exited,
      bound.pipe(Effect.andThen(Effect.sync(() => program.child.kill("SIGKILL"))), Effect.andThen(program.exited))
    ).pipe(
      Effect.map((exitCode): Run => ({ exitCode, ...program.output() })),
      Effect.onInterrupt(() => Effect.sync(() => program.child.kill("SIGKILL")))
    )
  })
