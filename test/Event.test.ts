import { assert, describe, it } from "@effect/vitest"
import { DateTime, Effect, Schema } from "effect"
import * as Event from "../src/Event.ts"

const valid = {
  id: "7d1c0e4a",
  type: "order.created",
  source: "shop",
  timestamp: "2026-11-27T10:00:00.000Z",
  subject: "order-42",
  payload: { total: 12.5, lines: [{ sku: "a", quantity: 2 }] }
}

/** The decode failure's message for `json`, or a failure of the test when it decodes. */
const problemOf = (json: unknown) =>
  Event.decode(JSON.stringify(json)).pipe(
    Effect.flip,
    Effect.map((error) => error.message)
  )

describe("Event", () => {
  it.effect("decodes the wire form: timestamp to a UTC DateTime, payload kept as it is", () =>
    Effect.gen(function* () {
      const event = yield* Event.decode(JSON.stringify(valid))
      assert.instanceOf(event, Event.Event)
      assert.strictEqual(event.id, "7d1c0e4a")
      assert.strictEqual(DateTime.formatIso(event.timestamp), "2026-11-27T10:00:00.000Z")
      assert.deepStrictEqual(event.payload, valid.payload)
      assert.strictEqual(Event.keyOf(event), "order-42")
    })
  )

  it.effect("encodes back to the same JSON it was decoded from", () =>
    Effect.gen(function* () {
      const event = yield* Event.decode(JSON.stringify(valid))
      assert.deepStrictEqual(JSON.parse(yield* Event.encode(event)), valid)
    })
  )

  it.effect("without a subject the key is the id", () =>
    Effect.gen(function* () {
      const { subject: _, ...withoutSubject } = valid
      const event = yield* Event.decode(JSON.stringify(withoutSubject))
      assert.strictEqual(Event.keyOf(event), "7d1c0e4a")
    })
  )

  it.effect("each rule names the field and what it accepts", () =>
    Effect.gen(function* () {
      const cases: ReadonlyArray<readonly [unknown, RegExp]> = [
        [{ ...valid, id: "" }, /must not be empty[\s\S]*\["id"\]/],
        [{ ...valid, source: " shop" }, /must not start or end with spaces[\s\S]*\["source"\]/],
        [{ ...valid, subject: "x".repeat(257) }, /at most 256 characters[\s\S]*\["subject"\]/],
        [{ ...valid, type: "order created" }, /a dotted name[\s\S]*\["type"\]/],
        [{ ...valid, type: "9.order" }, /a dotted name[\s\S]*\["type"\]/],
        [{ ...valid, timestamp: "yesterday" }, /\["timestamp"\]/],
        [{ ...valid, payload: [1, 2] }, /a JSON object[\s\S]*\["payload"\]/],
        [{ ...valid, payload: null }, /a JSON object[\s\S]*\["payload"\]/],
        [{ ...valid, id: 7 }, /string[\s\S]*\["id"\]/]
      ]
      for (const [json, expected] of cases) assert.match(yield* problemOf(json), expected, JSON.stringify(json))
      const { payload: _, ...withoutPayload } = valid
      assert.match(yield* problemOf(withoutPayload), /Missing key[\s\S]*\["payload"\]/)
    })
  )

  it.effect("a value that is not JSON fails as a Schema error, not a defect", () =>
    Effect.gen(function* () {
      const error = yield* Event.decode("{not json").pipe(Effect.flip)
      assert.instanceOf(error, Schema.SchemaError)
    })
  )

  it.effect("a sample event is valid", () =>
    Effect.gen(function* () {
      const event = yield* Event.sample({ source: "demo", subjects: 10, sequence: 3 })
      const again = yield* Event.decode(yield* Event.encode(event))
      assert.strictEqual(again.id, event.id)
      assert.match(Event.keyOf(again), /^entity-\d$/)
    })
  )
})
