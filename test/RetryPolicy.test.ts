import { assert, describe, it } from "@effect/vitest"
import { Option } from "effect"
import type * as KafkaClient from "../src/KafkaClient.ts"
import * as RetryPolicy from "../src/RetryPolicy.ts"

const policy = RetryPolicy.make({ retryTopicPrefix: "orders-retry", retryMax: 3, dlqTopic: "orders-dlq" })

const consumed = (headers: Record<string, string> = {}): KafkaClient.ConsumedRecord => ({
  topic: "orders",
  partition: 0,
  offset: 7n,
  key: null,
  value: null,
  headers: Object.fromEntries(Object.entries(headers).map(([name, value]) => [name, Buffer.from(value)])),
  timestamp: 1_000
})

describe("RetryPolicy", () => {
  it("time headers are whole milliseconds, the due time rounded up, when the clock reads fractions", () => {
    const hop = RetryPolicy.nextHop(
      policy,
      consumed(),
      { tag: "PaymentDown", message: "down", fatal: false },
      { now: 1_234.75, consumerGroup: "g", history: Option.none() }
    )
    assert.strictEqual(hop.headers?.[RetryPolicy.headers.firstFailureAt], "1234")
    assert.strictEqual(hop.headers?.[RetryPolicy.headers.dueAt], "6235", "never before now + 5 s")
  })

  it("a fractional due-at header is read rounded up; anything else unreadable reads as none", () => {
    const dueAt = (value: string) => RetryPolicy.dueAt(consumed({ [RetryPolicy.headers.dueAt]: value }))
    assert.strictEqual(dueAt("6234"), 6234)
    assert.strictEqual(dueAt("6234.25"), 6235)
    assert.strictEqual(dueAt("soon"), undefined)
    assert.strictEqual(dueAt("1e4"), undefined)
  })
})
