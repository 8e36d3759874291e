/**
 * A complete app: an order service that publishes orders and charges each one in a Processor handler.
 *
 * - `Order` is the topic's value, a `Schema`: records that do not decode go to the dead-letter topic with the
 *   reason, and the partition moves on.
 * - `charge` fails with `PaymentUnavailable` (retryable: in place, then through the retry topics) or
 *   `PaymentDeclined` (fatal: straight to the dead-letter topic).
 * - `main` makes sure the topics exist before it sends (the Processor creates the retry and dead-letter topics
 *   with KAFKA_CREATE_TOPICS=true), publishes a few orders and processes until stopped (Ctrl-C).
 *
 * Run it against a broker: `KAFKA_BROKERS=127.0.0.1:9092 KAFKA_CREATE_TOPICS=true node examples/orders.ts`
 * (after `npm run build`); examples/orders.test.ts runs it on the in-memory broker.
 */
import { NodeRuntime } from "@effect/platform-node"
import { Effect, Layer, Schema } from "effect"
import * as KafkaClient from "kafka-effect/KafkaClient"
import * as KafkaProducer from "kafka-effect/KafkaProducer"
import * as Processor from "kafka-effect/Processor"

export const Order = Schema.Struct({ id: Schema.String, customer: Schema.String, amount: Schema.Number })
export type Order = typeof Order.Type

/** The payment service did not answer: worth trying again later. */
export class PaymentUnavailable extends Schema.TaggedError<PaymentUnavailable>()("PaymentUnavailable", {
  orderId: Schema.String
}) {
  override get message() {
    return `the payment service did not answer for order ${this.orderId}`
  }
}

/** The payment was refused: trying again cannot help. */
export class PaymentDeclined extends Schema.TaggedError<PaymentDeclined>()("PaymentDeclined", {
  orderId: Schema.String
}) {
  override get message() {
    return `the payment of order ${this.orderId} was declined`
  }
}

/** The orders topic; values are encoded to JSON by `Order`. */
export const Orders = KafkaProducer.typedTopic("orders", Order)

/** Charges an order (a stand-in for a call to a payment service). */
export const charge = (order: Order): Effect.Effect<void, PaymentUnavailable | PaymentDeclined> =>
  order.amount > 1_000
    ? Effect.fail(new PaymentDeclined({ orderId: order.id }))
    : order.amount < 0
      ? Effect.fail(new PaymentUnavailable({ orderId: order.id }))
      : Effect.logInfo(`charged ${order.customer} ${order.amount}`)

export const handlers = [
  Processor.handler({
    topic: Orders.topic,
    value: Order,
    handle: ({ value }) => charge(value),
    fatal: (error) => error._tag === "PaymentDeclined"
  })
]

/** Creates the topics if allowed, publishes orders (keyed by customer: their order is kept), and processes them. */
export const main = Effect.gen(function* () {
  yield* Processor.ensureTopics(handlers)
  for (const order of [
    { id: "o-1", customer: "ada", amount: 30 },
    { id: "o-2", customer: "ada", amount: 2_500 },
    { id: "o-3", customer: "grace", amount: 12 }
  ]) {
    yield* Orders.send(order, { key: order.customer })
  }
  return yield* Processor.run(handlers)
})

/** Everything from the environment (KAFKA_BROKERS, KAFKA_CONSUMER_GROUP_ID, …). */
export const Live = Processor.layerConfig.pipe(
  Layer.provideMerge(KafkaProducer.layerConfig),
  Layer.provideMerge(KafkaClient.layerConfig)
)

if (import.meta.main) NodeRuntime.runMain(main.pipe(Effect.provide(Live)))
