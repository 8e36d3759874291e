/**
 * `npm test`: the whole suite as two vitest runs side by side, each two files at a time. One runs the unit and
 * broker (kafkajs) projects; the other the broker:platformatic project, then the cluster project (three-node
 * clusters of its own). Split so, the two take about the same time (measured: about 400 and 550 s of test files
 * on two workers each), and both mostly wait on brokers, timers and child processes, so together they take about
 * the time of the longer one. The exit code is the first failure's (0 when both pass); a signal is passed to
 * both, and both are waited for on every exit path.
 */
import { type ChildProcess, spawn } from "node:child_process"
import * as Os from "node:os"
import * as Path from "node:path"

const root = Path.join(import.meta.dirname, "..")
const vitest = Path.join(root, "node_modules", "vitest", "vitest.mjs")
const extra = process.argv.slice(2)

const runs: ReadonlyArray<{ readonly name: string; readonly projects: ReadonlyArray<string> }> = [
  { name: "unit and kafkajs", projects: ["unit", "broker"] },
  { name: "platformatic and cluster", projects: ["broker:platformatic", "cluster"] }
]

// Node's compile cache for every process the suite starts (the programs, the members, vitest's workers): about
// 150 of them each compiled effect and the engines afresh, 0.9 CPU-s a start; with the cache, 0.6.
const env = {
  ...process.env,
  NODE_COMPILE_CACHE: process.env.NODE_COMPILE_CACHE ?? Path.join(Os.tmpdir(), "kafka-effect-compile-cache")
}

const start = (run: (typeof runs)[number]): Promise<{ readonly name: string; readonly code: number }> =>
  new Promise((resolve) => {
    const child: ChildProcess = spawn(
      process.execPath,
      [vitest, "run", ...run.projects.flatMap((project) => ["--project", project]), ...extra],
      { cwd: root, stdio: ["ignore", "inherit", "inherit"], env }
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
