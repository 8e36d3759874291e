/**
 * The demo (scripts/demo.ts) as a user runs it, as its own OS process with the programs from src/: at its defaults
 * its counts add up; stopped by SIGINT, it stops its own broker and its programs and exits 130; a phase that fails
 * exits 1 and says which and why.
 */
import * as Net from "node:net"
import * as Path from "node:path"
import { assert, describe, it } from "@effect/vitest"
import { Duration, Effect, type Scope } from "effect"
import { inject } from "vitest"
import * as Program from "../scripts/program.ts"

const brokers = inject("kafkaBrokers")

const demoScript = Path.join(Program.root, "scripts", "demo.ts")

const hasExited = (demo: Program.Program) => demo.child.exitCode !== null || demo.child.signalCode !== null

/**
 * The demo as a process for the life of the scope; still running at the end, it gets SIGTERM (it then stops what it
 * started), and SIGKILL only if that takes a minute.
 */
const startDemo = (
  args: ReadonlyArray<string>,
  env: Record<string, string>
): Effect.Effect<Program.Program, never, Scope.Scope> =>
  Effect.acquireRelease(
    Effect.sync(() => Program.start(demoScript, { args, env })),
    (demo) =>
      hasExited(demo)
        ? Effect.void
        : Effect.sync(() => demo.child.kill("SIGTERM")).pipe(
            Effect.andThen(demo.exited),
            Effect.timeoutOrElse({
              duration: "60 seconds",
              orElse: () => Effect.sync(() => demo.child.kill("SIGKILL"))
            })
          )
  )

const failure = (demo: Program.Program, what: string) => {
  const { stdout, stderr } = demo.output()
  return new Error(`${what}; the demo printed:\n${stdout}\n${stderr}`)
}

/** The demo's exit code, once it exited within `limit`. */
const exitCodeWithin = (demo: Program.Program, limit: Duration.Input) =>
  demo.exited.pipe(
    Effect.timeoutOrElse({
      duration: limit,
      orElse: () =>
        Effect.die(failure(demo, `the demo did not finish within ${Duration.format(Duration.fromInputUnsafe(limit))}`))
    })
  )

/** Waits until the demo's stdout matches `pattern`, and returns the match; dies if the demo exits before. */
const printed = (demo: Program.Program, pattern: RegExp, limit: Duration.Input) =>
  Effect.raceFirst(
    Effect.callback<RegExpExecArray>((resume) => {
      const check = () => {
        const match = pattern.exec(demo.output().stdout)
        if (match !== null) resume(Effect.succeed(match))
        return match !== null
      }
      if (check()) return
      // Program.start's own listener ran first, so output() already holds the chunk.
      const onData = () => check() && demo.child.stdout?.off("data", onData)
      demo.child.stdout?.on("data", onData)
      return Effect.sync(() => demo.child.stdout?.off("data", onData))
    }),
    Effect.flatMap(demo.exited, (code) =>
      Effect.die(failure(demo, `the demo exited with ${code} before printing ${pattern}`))
    )
  ).pipe(
    Effect.timeoutOrElse({
      duration: limit,
      orElse: () => Effect.die(failure(demo, `the demo did not print ${pattern} in time`))
    })
  )

/** True once no process has this PID: kill(pid, 0) fails with ESRCH. */
const isGone = (pid: number) => {
  try {
    process.kill(pid, 0)
    return false
  } catch (error) {
    return (error as NodeJS.ErrnoException).code === "ESRCH"
  }
}

/** The PID the demo printed for what it started, e.g. `started the consumer program (pid 123)`. */
const pidOf = (stdout: string, started: RegExp) => {
  const pid = new RegExp(`\\[demo\\] started ${started.source}.* \\(pid (\\d+)\\)`).exec(stdout)?.[1]
  assert.isDefined(pid, `the demo printed no PID for ${started}:\n${stdout}`)
  return Number(pid)
}

/** A loopback port with nothing listening on it. */
const closedPort = Effect.callback<number>((resume) => {
  const server = Net.createServer().listen(0, "127.0.0.1", () => {
    const address = server.address()
    const port = typeof address === "object" && address !== null ? address.port : 0
    server.close(() => resume(Effect.succeed(port)))
  })
})

/** What the demo needs to start a broker of its own, without KAFKA_BROKERS. */
const ownBrokerEnv = Object.fromEntries(
  ["HOME", "JAVA_HOME", "XDG_CACHE_HOME", "TMPDIR"].flatMap((name) => {
    const value = process.env[name]
    return value === undefined ? [] : [[name, value]]
  })
)

describe("the demo", () => {
  it.live(
    "at its defaults, its counts add up: 1,000 events + 5 poison records = processed + dead-lettered",
    () =>
      Effect.gen(function* () {
        const demo = yield* startDemo(["--from-src"], { KAFKA_BROKERS: brokers })
        const exitCode = yield* exitCodeWithin(demo, "180 seconds")
        const { stdout, stderr } = demo.output()
        assert.strictEqual(exitCode, 0, `${stdout}\n${stderr}`)
        assert.match(stdout, /produced\s+1005 \(1000 events/)
        assert.include(stdout, "✓ processed + dead-lettered = produced")
        assert.include(stdout, "✓ what the DLQ holds is what was dead-lettered")
        assert.notInclude(stdout, "✗")
        for (const phase of ["broker", "consumer start", "produce", "poison", "settle", "consumer stop", "replay"]) {
          assert.include(stdout, `[demo] ${phase}: `)
        }
      }),
    200_000
  )

  it.live(
    "stopped by SIGINT, it stops its own broker and the programs it started, by PID, and exits 130",
    () =>
      Effect.gen(function* () {
        // Without KAFKA_BROKERS: a broker of its own, on a free port in a fresh directory.
        const demo = yield* startDemo(["--from-src"], ownBrokerEnv)
        yield* printed(demo, /\[demo\] started the producer program \(pid \d+\)/, "180 seconds")
        demo.child.kill("SIGINT")
        const exitCode = yield* exitCodeWithin(demo, "90 seconds")
        const { stdout, stderr } = demo.output()
        assert.strictEqual(exitCode, 130, `${stdout}\n${stderr}`)
        assert.include(stdout, "[demo] SIGINT in phase produce: stopping what the demo started")
        assert.include(stdout, "[demo] stopped by SIGINT")
        const pids = {
          broker: pidOf(stdout, /a local Kafka broker/),
          consumer: pidOf(stdout, /the consumer program/),
          producer: pidOf(stdout, /the producer program/)
        }
        for (const [what, pid] of Object.entries(pids)) {
          assert.isTrue(isGone(pid), `the ${what} (pid ${pid}) is still running:\n${stdout}`)
        }
      }),
    300_000
  )

  it.live("a phase that fails exits 1 and says which and why: a broker that does not answer", () =>
    Effect.gen(function* () {
      const port = yield* closedPort
      const demo = yield* startDemo(["--from-src"], { KAFKA_BROKERS: `127.0.0.1:${port}` })
      const exitCode = yield* exitCodeWithin(demo, "60 seconds")
      const { stdout, stderr } = demo.output()
      assert.strictEqual(exitCode, 1, `${stdout}\n${stderr}`)
      assert.include(stderr, `[demo] FAILED in phase broker: cannot connect to 127.0.0.1:${port}`)
      assert.notInclude(stdout, "[demo] consumer start:")
    })
  )

  it.live("a program that fails fails its phase, with the end of what it printed on stderr", () =>
    Effect.gen(function* () {
      const demo = yield* startDemo(["--from-src"], { KAFKA_BROKERS: brokers, LOG_LEVEL: "loud" })
      const exitCode = yield* exitCodeWithin(demo, "60 seconds")
      const { stdout, stderr } = demo.output()
      assert.strictEqual(exitCode, 1, `${stdout}\n${stderr}`)
      assert.include(stderr, "[demo] FAILED in phase consumer start: the consumer program exited with 2")
      assert.include(stderr, "LOG_LEVEL")
      assert.isTrue(isGone(pidOf(stdout, /the consumer program/)))
    })
  )
})
