/**
 * `npm test`: the whole suite as two vitest runs side by side, each two files at a time. One runs the unit,
 * broker and broker:platformatic projects (on single-node brokers); the other the cluster project (three-node
 * clusters of its own). Both mostly wait on brokers, timers and child processes, so together they take about the
 * time of the longer one rather than the sum. The exit code is the first failure's (0 when both pass); a signal
 * is passed to both, and both are waited for on every exit path.
 */
import { type ChildProcess, spawn } from "node:child_process"
import * as Path from "node:path"

const root = Path.join(import.meta.dirname, "..")
const vitest = Path.join(root, "node_modules", "vitest", "vitest.mjs")
const extra = process.argv.slice(2)

const runs: ReadonlyArray<{ readonly name: string; readonly projects: ReadonlyArray<string> }> = [
  { name: "single-node", projects: ["unit", "broker", "broker:platformatic"] },
  { name: "cluster", projects: ["cluster"] }
]

const start = (run: (typeof runs)[number]): Promise<{ readonly name: string; readonly code: number }> =>
  new Promise((resolve) => {
    const child: ChildProcess = spawn(
      process.execPath,
      [vitest, "run", ...run.projects.flatMap((project) => ["--project", project]), ...extra],
      { cwd: root, stdio: ["ignore", "inherit", "inherit"] }
    )
    children.push(child)
    child.on("close", (code, signal) => resolve({ name: run.name, code: code ?? (signal === null ? 1 : 128) }))
  })

const children: Array<ChildProcess> = []
for (const signal of ["SIGINT", "SIGTERM"] as const) {
  process.on(signal, () => {
    for (const child of children) child.kill(signal)
  })
}

const results = await Promise.all(runs.map(start))
for (const { name, code } of results) {
  console.log(`[test] ${name}: ${code === 0 ? "passed" : `failed (exit ${code})`}`)
}
process.exitCode = results.find((result) => result.code !== 0)?.code ?? 0
