/**
 * The group coordinator's node killed (-9) in the middle of a group's commits: on each engine, three members as
 * separate processes commit every 200 ms while a producer process sends, and the node leading the groups'
 * `__consumer_offsets` partition dies right after one of their commits, so the next ones meet it gone. Another node
 * takes the groups over; a member of each then leaves, so each group also rebalances under the new coordinator.
 * Both engines run at once: their group ids differ only by "Aa" and "BB", which have the same Java hash code, so
 * the broker places both groups on the same partition, and one kill hits both.
 */
import { assert, describe, it } from "@effect/vitest"
import { Effect } from "effect"
import * as Cluster from "../../scripts/kafka/cluster.ts"
import { awaitCommittedToEnd, readTopic, uniqueName } from "../support/kafka.ts"
import {
  commitsToLostPartitions,
  handledTwice,
  type Member,
  member,
  orderViolations,
  until
} from "../support/members.ts"
import {
  coordinatorOf,
  createReplicated,
  eventIds,
  keepLogOnFailure,
  memberEnv,
  pacedProducer,
  producerLines
} from "./support.ts"

const engines = ["kafkajs", "platformatic"] as const

const distinct = (members: ReadonlyArray<Member>) =>
  new Set(members.flatMap((m) => m.processed.map((r) => `${r.partition}/${r.offset}`)))

const commits = (members: ReadonlyArray<Member>) =>
  members.reduce((n, m) => n + m.events.filter((e) => e.kind === "committed").length, 0)

/** One engine's group: three members and a paced producer on a topic of its own. */
const coordinatorSide = (engine: (typeof engines)[number], brokers: string, groupId: string) =>
  Effect.gen(function* () {
    const topic = uniqueName(`coordinator-${engine}`)
    yield* createReplicated(brokers, topic, 6)
    const env = memberEnv(engine, brokers, topic, groupId, { commitMs: 200, handlerMs: 1 })
    const members = [
      yield* member(`${engine}-a`, env),
      yield* member(`${engine}-b`, env),
      yield* member(`${engine}-c`, env)
    ]
    for (const m of members) yield* keepLogOnFailure(`${topic}-${m.name}`, () => m.stderr)
    const producer = yield* pacedProducer(engine, brokers, topic, 300)
    const ready = until(
      `every ${engine} member assigned and 2,000 records handled`,
      () =>
        members.every((m) => m.events.some((e) => e.kind === "assigned" && e.partitions.length > 0)) &&
        distinct(members).size >= 2_000,
      members
    )
    let atKill = 0
    let killedAt = 0
    const killed = () => {
      atKill = distinct(members).size
      killedAt = Date.now()
    }
    // The group goes on under another coordinator: records handled, commits landing again.
    const recovered = Effect.gen(function* () {
      yield* until(`2,000 more ${engine} records handled`, () => distinct(members).size >= atKill + 2_000, members)
      const committedBefore = commits(members)
      yield* until(`${engine} commits again`, () => commits(members) > committedBefore, members)
      return Date.now() - killedAt
    })
    const verify = (survivors: string, coordinator: number, next: number, recoveredIn: number) =>
      Effect.gen(function* () {
        // A member leaves: the group rebalances under the new coordinator.
        const [a, b, c] = members as [Member, Member, Member]
        a.signal("SIGTERM")
        yield* a.exited
        assert.strictEqual(a.exitCode, 0, `${a.name} exits 0 on SIGTERM: ${a.stderr.slice(-1000)}`)
        producer.stop()
        assert.strictEqual(yield* producer.exited, 0, producer.output().stderr.slice(-2000))
        const { acked, failed, begun } = producerLines(producer)
        assert.strictEqual(acked.length + failed.length, begun, `${engine}: every send begun has an outcome`)

        const stored = yield* readTopic(survivors, topic)
        const storedIds = new Set(eventIds(stored))
        assert.deepStrictEqual(
          acked.filter((id) => !storedIds.has(id)),
          [],
          `${engine}: every acked event is stored`
        )
        yield* awaitCommittedToEnd(survivors, groupId, topic, "120 seconds")
        for (const m of [b, c]) m.signal("SIGTERM")
        for (const m of [b, c]) {
          yield* m.exited
          assert.strictEqual(m.exitCode, 0, `${m.name} exits 0 on SIGTERM: ${m.stderr.slice(-1000)}`)
        }
        const handled = distinct(members)
        const unhandled = stored.filter((r) => !handled.has(`${r.partition}/${r.offset}`))
        assert.strictEqual(unhandled.length, 0, `${engine}: every stored record handled`)
        for (const m of members) {
          assert.strictEqual(commitsToLostPartitions(m), 0, `${m.name}: no commit to a partition it did not own`)
          assert.strictEqual(orderViolations(m), 0, `${m.name}: per-key order within each stretch`)
        }
        const total = members.reduce((n, m) => n + m.processed.length, 0)
        console.log(
          `${engine}, coordinator (node ${coordinator}) killed: node ${next} took over; consumption and commits back ${(recoveredIn / 1000).toFixed(1)} s after the kill; ` +
            `commits that failed and were retried: ${members.map((m) => `${m.name} ${m.commitFailures}`).join(", ")}; ` +
            `${acked.length} acked, ${failed.length} failed, 0 lost; ${stored.length} stored, ${total - handled.size} handled again (at-least-once), ` +
            `${members.reduce((n, m) => n + handledTwice(m), 0)} of them by the same member`
        )
      })
    return { members, ready, killed, recovered, verify }
  })

describe("the group coordinator killed", () => {
  it.live(
    "the coordinator's node killed -9 right after a commit, three members per engine committing every 200 ms, both engines at once: no commit to a lost partition, no record lost, order kept",
    () =>
      Effect.scoped(
        Effect.gen(function* () {
          const cluster = yield* Cluster.acquire({ nodes: 3 })
          const base = uniqueName("coordinated")
          // "Aa" and "BB" hash alike in Java: the two groups share a __consumer_offsets partition, so a coordinator.
          const groups = [`${base}-Aa`, `${base}-BB`]
          const sides = yield* Effect.forEach(
            engines,
            (engine, i) => coordinatorSide(engine, cluster.brokers, groups[i] ?? ""),
            { concurrency: "unbounded" }
          )
          yield* Effect.forEach(sides, (side) => side.ready, { concurrency: "unbounded", discard: true })
          const coordinator = yield* coordinatorOf(cluster.brokers, groups[0] ?? "")
          assert.strictEqual(
            yield* coordinatorOf(cluster.brokers, groups[1] ?? ""),
            coordinator,
            "one node coordinates both groups"
          )
          // Right after a commit is logged: the next, 200 ms later at most, meets the node gone.
          const all = sides.flatMap((side) => side.members)
          const before = commits(all)
          yield* until("a commit", () => commits(all) > before, all)
          yield* Cluster.kill(cluster, coordinator)
          for (const side of sides) side.killed()
          const survivors = cluster.nodes
            .filter((node) => node.id !== coordinator)
            .map((node) => `127.0.0.1:${node.port}`)
            .join(",")
          const recoveredIn = yield* Effect.forEach(sides, (side) => side.recovered, { concurrency: "unbounded" })
          const next = yield* coordinatorOf(survivors, groups[0] ?? "")
          assert.notStrictEqual(next, coordinator, "another node coordinates the groups")
          yield* Effect.forEach(
            sides,
            (side, i) => side.verify(survivors, coordinator, next, recoveredIn[i] ?? Number.NaN),
            { concurrency: "unbounded", discard: true }
          )
        })
      ),
    300_000
  )
})
