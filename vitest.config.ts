import { defineConfig } from "vitest/config"

// Two projects: `unit` needs nothing but Node (the examples' tests are unit tests too); `broker` runs against a real
// Kafka broker, started by the global setup for the run (or the one named by KAFKA_BROKERS). `npm test` runs both.
// The `source` condition resolves `kafka-effect/…` imports (the examples import the package as users do) to src/.
export default defineConfig({
  resolve: { conditions: ["source"] },
  ssr: { resolve: { conditions: ["source"] } },
  test: {
    projects: [
      {
        extends: true,
        test: {
          name: "unit",
          include: ["test/**/*.test.ts", "examples/**/*.test.ts"],
          exclude: ["test/**/*.broker.test.ts"]
        }
      },
      {
        extends: true,
        test: {
          name: "broker",
          include: ["test/**/*.broker.test.ts"],
          globalSetup: ["test/support/brokerSetup.ts"],
          testTimeout: 120_000,
          hookTimeout: 120_000
        }
      }
    ]
  }
})
