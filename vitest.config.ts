import { defineConfig } from "vitest/config"

// Two projects: `unit` needs nothing but Node; `broker` runs against a real Kafka broker, started by the global
// setup for the run (or the one named by KAFKA_BROKERS). `npm test` runs both.
export default defineConfig({
  test: {
    projects: [
      {
        test: {
          name: "unit",
          include: ["test/**/*.test.ts"],
          exclude: ["test/**/*.broker.test.ts"]
        }
      },
      {
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
