/**
 * A group scaled out and in across OS processes on the cluster: up to 6 members on 24 partitions, started and
 * stopped (SIGTERM, one stop in four SIGKILL) at random for 2 minutes while a producer process sends. Both engines
 * run at once, each with its own topic, group and producer, on one cluster: the machine is as busy as it gets.
 */
import { assert, describe, it } from "@effect/vitest"
import { Effect } from "effect"
import * as Cluster from "../../scripts/kafka/cluster.ts"
import { awaitCommittedToEnd, readTopic, uniqueName } from "../support/kafka.ts"
import { commitsToLostPartitions, type Member, member, orderViolations, until } from "../support/members.ts"
import { random } from "../support/random.ts"
import { createReplicated, eventIds, keepLogOnFailure, memberEnv, pacedProducer, producerLines } from "./support.ts"

const partitions = 24
const maxMembers = 6
const runFor = 120_000

interface Change {
  readonly at: number
  readonly what: string
}

/**
 * How long each change of membership took to settle: from the change to the first moment every member then in the
 * group (started, and not yet told to stop) has logged an assignment since the change, and those assignments hold
 * all partitions, each once. A change followed by another before it settled is counted as superseded (a member
 * killed holds its partitions until its session times out, 10 s, longer than most gaps between changes).
 */
const settleTimes = (
  changes: ReadonlyArray<Change>,
  members: ReadonlyArray<Member>,
  startedAt: ReadonlyMap<Member, number>,
  signaledAt: ReadonlyMap<Member, number>
) =>
  changes.map((change, i) => {
    const nextChange = changes[i + 1]?.at ?? Number.POSITIVE_INFINITY
    const assignments = (m: Member) =>
      m.events.flatMap((e) => (e.kind === "assigned" && e.at > change.at && e.at < nextChange ? [e] : []))
    const moments = members.flatMap((m) => assignments(m).map((e) => e.at)).sort((x, y) => x - y)
    for (const at of moments) {
      const inGroup = members.filter(
        (m) =>
          (startedAt.get(m) ?? Number.POSITIVE_INFINITY) <= at && (signaledAt.get(m) ?? Number.POSITIVE_INFINITY) > at
      )
      const latest = inGroup.map((m) =>
        assignments(m)
          .filter((e) => e.at <= at)
          .at(-1)
      )
      if (latest.some((e) => e === undefined)) continue
      const held = latest.flatMap((e) => e?.partitions ?? [])
      if (held.length === partitions && new Set(held).size === partitions)
        return { ...change, settledIn: at - change.at }
    }
    return { ...change, settledIn: undefined }
  })

const scenario = (engine: "kafkajs" | "platformatic", brokers: string, seed: number) =>
  Effect.gen(function* () {
    const next = random(seed)
    const topic = uniqueName(`scale-${engine}`)
    yield* createReplicated(brokers, topic, partitions)
    const groupId = `${topic}-group`
    const env = memberEnv(engine, brokers, topic, groupId, { commitMs: 500, handlerMs: 2 })
    const producer = yield* pacedProducer(engine, brokers, topic, 150)

    const all: Array<Member> = []
    const running = () => all.filter((m) => m.exitCode === undefined && !stopping.has(m))
    const stopping = new Set<Member>()
    const changes: Array<Change> = []
    const killed = new Set<Member>()
    const startedAt = new Map<Member, number>()
    const signaledAt = new Map<Member, number>()
    const start = Effect.gen(function* () {
      const m = yield* member(`${engine}-${all.length + 1}`, env)
      startedAt.set(m, Date.now())
      all.push(m)
      yield* keepLogOnFailure(`${topic}-${m.name}`, () => m.stderr)
      changes.push({ at: Date.now(), what: "start" })
    })
    const stop = Effect.sync(() => {
      const candidates = running()
      const m = candidates[Math.floor(next() * candidates.length)] as Member
      const signal = next() < 0.25 ? "SIGKILL" : "SIGTERM"
      if (signal === "SIGKILL") killed.add(m)
      stopping.add(m)
      signaledAt.set(m, Date.now())
      m.signal(signal)
      changes.push({ at: Date.now(), what: signal === "SIGKILL" ? "kill" : "stop" })
    })
    for (let i = 0; i < 3; i++) yield* start
    const began = Date.now()
    while (Date.now() - began < runFor) {
      // A change every 3 to 9 s, at random: start below 2 members, stop at 6, otherwise either.
      yield* Effect.sleep(3_000 + next() * 6_000)
      const n = running().length
      if (n < 2 || (n < maxMembers && next() < 0.5)) yield* start
      else yield* stop
    }
    producer.stop()
    assert.strictEqual(yield* producer.exited, 0, producer.output().stderr.slice(-2000))
    const { acked, failed, begun } = producerLines(producer)
    assert.strictEqual(acked.length + failed.length, begun, "every send begun has an outcome")
    assert.deepStrictEqual(failed.slice(0, 5), [], "no send failed")
    while (running().length < 2) yield* start
    yield* until(
      "the last members assigned",
      () => running().every((m) => m.events.some((e) => e.kind === "assigned")),
      running()
    )
    yield* awaitCommittedToEnd(brokers, groupId, topic, "120 seconds")
    for (const m of running()) m.signal("SIGTERM")
    for (const m of all) yield* m.exited
    for (const m of all.filter((m) => !killed.has(m))) {
      // A SIGTERM that lands while Node is still loading the program, before it handles signals, ends it the
      // default way; once it has logged, the program shuts down gracefully and exits 0.
      if (m.exitSignal === "SIGTERM" && !m.stderr.includes("{")) continue
      assert.strictEqual(m.exitCode, 0, `${m.name} exits 0 on SIGTERM: ${m.stderr.slice(-1000)}`)
    }

    const stored = yield* readTopic(brokers, topic)
    const storedIds = new Set(eventIds(stored))
    assert.deepStrictEqual(
      acked.filter((id) => !storedIds.has(id)),
      [],
      "every acked event is stored"
    )
    const handled = new Set(all.flatMap((m) => m.processed.map((r) => `${r.partition}/${r.offset}`)))
    const unhandled = stored.filter((r) => !handled.has(`${r.partition}/${r.offset}`))
    assert.strictEqual(unhandled.length, 0, `every stored record handled (${unhandled.length} not)`)
    for (const m of all) {
      assert.strictEqual(orderViolations(m), 0, `${m.name}: per-key order within each stretch`)
      assert.strictEqual(commitsToLostPartitions(m), 0, `${m.name}: no commit to a partition it did not own`)
    }
    const settled = settleTimes(changes, all, startedAt, signaledAt)
    const times = (what: string) =>
      settled
        .filter((c) => c.what === what && c.settledIn !== undefined)
        .map((c) => c.settledIn as number)
        .sort((x, y) => x - y)
    const describeTimes = (what: string) => {
      const t = times(what)
      return t.length === 0
        ? `${what}: none settled`
        : `${what} ×${t.length}: median ${(t[Math.floor(t.length / 2)] as number) / 1000} s, max ${(t[t.length - 1] as number) / 1000} s`
    }
    const handledTotal = all.reduce((n, m) => n + m.processed.length, 0)
    const shutdowns = all
      .filter((m) => !killed.has(m) && m.signalledAt !== undefined && m.exitedAt !== undefined)
      .map((m) => ((m.exitedAt as number) - (m.signalledAt as number)) / 1000)
      .sort((x, y) => x - y)
    console.log(
      `${engine}, ${all.length} member processes over ${runFor / 1000} s (${changes.length - 3} changes after the first 3 starts; ` +
        `${killed.size} SIGKILLed, having handled ${[...killed].reduce((n, m) => n + m.processed.length, 0)} records): ${acked.length} acked, ${stored.length} stored, all handled, ${handledTotal - handled.size} handled again; ` +
        `rebalances settled — ${["start", "stop", "kill"].map(describeTimes).join("; ")}; ` +
        `${settled.filter((c) => c.settledIn === undefined).length} superseded by the next change before settling; ` +
        `SIGTERM to exit ×${shutdowns.length}: median ${shutdowns[Math.floor(shutdowns.length / 2)]} s, max ${shutdowns.at(-1)} s`
    )
    return settled
  })

describe("a group scaled out and in on the cluster", () => {
  it.live(
    "6 members on 24 partitions started and stopped at random for 2 minutes under load, both engines at once: every record handled, per-key order within each member's stretch, no commit to a lost partition",
    () =>
      Effect.scoped(
        Effect.gen(function* () {
          const cluster = yield* Cluster.acquire({ nodes: 3 })
          yield* Effect.all(
            [scenario("kafkajs", cluster.brokers, 18), scenario("platformatic", cluster.brokers, 1848)],
            { concurrency: "unbounded" }
          )
        })
      ),
    420_000
  )
})
