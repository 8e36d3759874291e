/**
 * Our programs as users run them: separate Node processes (a .ts from src/ runs with type stripping, no build),
 * configured by `env` alone (plus PATH). Output is collected as it comes; `onStderr` sees it too.
 */
import { type ChildProcess, spawn } from "node:child_process"
import * as Path from "node:path"
import { Effect } from "effect"

export const root = Path.join(import.meta.dirname, "..")
export const consumerProgram = Path.join(root, "src", "consumer.ts")

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
    /** written to the program's stdin, which is then closed; without it stdin is /dev/null */
    readonly stdin?: string | undefined
  }
): Program => {
  const child = spawn(
    process.execPath,
    ["--experimental-strip-types", "--no-warnings", script, ...(options.args ?? [])],
    {
      env: { PATH: process.env.PATH ?? "", ...options.env },
      stdio: [options.stdin === undefined ? "ignore" : "pipe", "pipe", "pipe"]
    }
  )
  if (options.stdin !== undefined) child.stdin?.end(options.stdin)
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
