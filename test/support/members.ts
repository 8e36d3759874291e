/**
 * Consumer-group members as separate OS processes (test/support/consumerProcess.ts), each printing every record it
 * handles and logging its assignments and commits as JSON: what they did, read from their outputs as they come, and
 * the checks the tests make on it (per-key order within each stretch, records handled twice, commits to partitions
 * not owned).
 */
import { type ChildProcess, spawn } from "node:child_process"
import * as Path from "node:path"
import { Effect, Schedule } from "effect"
import * as Program from "../../scripts/program.ts"
import { testEngine } from "./kafka.ts"

const memberProgram = Path.join(import.meta.dirname, "consumerProcess.ts")

export interface Processed {
  readonly partition: number
  readonly offset: bigint
  readonly key: string
}

/** What a member process did, read from its outputs as they come. */
export class Member {
  readonly name: string
  readonly child: ChildProcess
  readonly processed: Array<Processed> = []
  /** stdout and stderr lines, in the order the process wrote each stream */
  readonly events: Array<
    | { readonly kind: "processed"; readonly record: Processed }
    | {
        readonly kind: "assigned"
        readonly partitions: ReadonlyArray<number>
        readonly generation: number
        /** when the test read it (ms since the epoch) */
        readonly at: number
      }
    | { readonly kind: "committed"; readonly partitions: ReadonlyArray<number>; readonly at: number }
  > = []
  /** commits that failed and were left for the next one ("commit failed, will try again") */
  commitFailures = 0
  exitCode: number | null | undefined = undefined
  /** the signal that ended the process, when one did */
  exitSignal: NodeJS.Signals | null = null
  /** when the process was seen to exit (ms since the epoch) */
  exitedAt: number | undefined = undefined
  /** when the test last signalled it (ms since the epoch) */
  signalledAt: number | undefined = undefined
  stderr = ""

  constructor(name: string, env: Record<string, string>) {
    this.name = name
    this.child = spawn(process.execPath, ["--experimental-strip-types", "--no-warnings", memberProgram], {
      env: { ...Program.inherited(), LOG_FORMAT: "json", LOG_LEVEL: "debug", ...testEngine, ...env },
      stdio: ["ignore", "pipe", "pipe"]
    })
    let out = ""
    this.child.stdout?.on("data", (chunk) => {
      out += chunk
      const lines = out.split("\n")
      out = lines.pop() ?? ""
      for (const line of lines) {
        const [, partition, offset, key] = line.split(" ")
        const record = { partition: Number(partition), offset: BigInt(offset ?? "0"), key: key ?? "" }
        this.processed.push(record)
        this.events.push({ kind: "processed", record })
      }
    })
    let err = ""
    this.child.stderr?.on("data", (chunk) => {
      this.stderr += chunk
      err += chunk
      const lines = err.split("\n")
      err = lines.pop() ?? ""
      for (const line of lines) {
        if (!line.startsWith("{")) continue
        const entry = JSON.parse(line) as { message: unknown; annotations: Record<string, string> }
        const message = Array.isArray(entry.message) ? entry.message.join(" ") : String(entry.message)
        const partitionsOf = (text: string) => [...text.matchAll(/\[(\d+)\]/g)].map((m) => Number(m[1]))
        if (message === "assigned") {
          this.events.push({
            kind: "assigned",
            partitions: partitionsOf(entry.annotations.partitions ?? ""),
            generation: Number(entry.annotations.generation),
            at: Date.now()
          })
        } else if (message === "committed") {
          this.events.push({
            kind: "committed",
            partitions: partitionsOf(entry.annotations.commits ?? ""),
            at: Date.now()
          })
        } else if (message.startsWith("commit failed")) {
          this.commitFailures++
        }
      }
    })
    this.child.on("exit", (code, signal) => {
      this.exitSignal = signal
      this.exitedAt = Date.now()
      this.exitCode = code
    })
  }

  signal(signal: NodeJS.Signals) {
    this.signalledAt = Date.now()
    this.child.kill(signal)
  }

  /** Waits (polling its outputs, which arrive on their own) until the process exited. */
  get exited() {
    return Effect.sync(() => this.exitCode !== undefined).pipe(
      Effect.repeat({ until: (done) => done, schedule: Schedule.spaced("50 millis") }),
      Effect.timeoutOrElse({
        duration: "60 seconds",
        orElse: () => Effect.die(new Error(`${this.name} did not exit; stderr:\n${this.stderr.slice(-2000)}`))
      })
    )
  }
}

/** Starts a member; it is killed when the scope closes, if still running. */
export const member = (name: string, env: Record<string, string>) =>
  Effect.acquireRelease(
    Effect.sync(() => new Member(name, env)),
    (m) => Effect.sync(() => m.exitCode === undefined && m.signal("SIGKILL"))
  )

/**
 * Polls until `condition` holds, failing with `what` once the members in `running` have shown no activity (a record
 * handled, an assignment, a commit) for `timeout` — a busy machine makes them slow, not stuck — or at once if one of
 * `running` exited (with the end of its stderr: a member that stopped will not make the condition come true).
 */
export const until = (
  what: string,
  condition: () => boolean,
  running: ReadonlyArray<Member>,
  timeout: Duration = "120 seconds"
) =>
  Effect.gen(function* () {
    const quietFor = Number.parseFloat(timeout) * 1000
    const activity = () => running.reduce((n, m) => n + m.events.length, 0)
    let seen = activity()
    let activeAt = Date.now()
    while (true) {
      const exited = running.find((m) => m.exitCode !== undefined)
      const done = condition()
      if (done) return
      if (exited !== undefined) {
        return yield* Effect.die(
          new Error(`${exited.name} exited with ${exited.exitCode} before ${what}:\n${exited.stderr.slice(-3000)}`)
        )
      }
      const now = activity()
      if (now > seen) {
        seen = now
        activeAt = Date.now()
      } else if (Date.now() - activeAt > quietFor) {
        return yield* Effect.die(
          new Error(
            `timed out waiting for ${what} (no activity for ${timeout}); ${running.map((m) => `${m.name} stderr ends:\n${m.stderr.slice(-2000)}`).join("\n")}`
          )
        )
      }
      yield* Effect.sleep("100 millis")
    }
  })
export type Duration = `${number} seconds`

/** Within each stretch between assignments, every key's offsets are increasing. */
export const orderViolations = (m: Member) => {
  let violations = 0
  let last = new Map<string, bigint>()
  for (const event of m.events) {
    if (event.kind === "assigned") last = new Map()
    if (event.kind !== "processed") continue
    const previous = last.get(event.record.key)
    if (previous !== undefined && event.record.offset <= previous) violations++
    last.set(event.record.key, event.record.offset)
  }
  return violations
}

/** Records (partition and offset) this member handled more than once. */
export const handledTwice = (m: Member) => {
  const seen = new Set<string>()
  let twice = 0
  for (const record of m.processed) {
    const id = `${record.partition}/${record.offset}`
    if (seen.has(id)) twice++
    seen.add(id)
  }
  return twice
}

/** Commits for partitions not in the member's assignment at the time. */
export const commitsToLostPartitions = (m: Member) => {
  let owned = new Set<number>()
  let bad = 0
  for (const event of m.events) {
    if (event.kind === "assigned") owned = new Set(event.partitions)
    if (event.kind === "committed") bad += event.partitions.filter((p) => !owned.has(p)).length
  }
  return bad
}
