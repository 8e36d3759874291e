import { defineConfig } from "vitest/config"

// Four projects: `unit` needs nothing but Node (the examples' tests are unit tests too); `broker` runs against a real
// Kafka broker, started by the global setup for the run (or the one named by KAFKA_BROKERS), on the engine
// KAFKA_CLIENT names (kafkajs when unset); `broker:platformatic` runs the same real-broker tests of the producer,
// consumer, processor and programs again on @platformatic/kafka, on a broker of its own. The
// contract suite names its engine per file, and the broker script's own tests have no engine: they run once.
// `cluster` (`npm run test:cluster`) starts a three-node cluster of its own per test. `npm test` (scripts/test.ts)
// runs all four, as two vitest runs side by side: unit and broker in one, broker:platformatic then cluster in the other.
// The `source` condition resolves `kafka-effect/…` imports (the examples import the package as users do) to src/.
export default defineConfig({
  resolve: { conditions: ["source"] },
  ssr: { resolve: { conditions: ["source"] } },
  test: {
    // Two test files at a time even on two cores (vitest's default is one fewer than the cores): the real-broker
    // tests mostly wait on brokers, timers and child processes, and they synchronise on events, not on time.
    maxWorkers: 2,
    projects: [
      {
        extends: true,
        test: {
          name: "unit",
          sequence: { groupOrder: 0 },
          // A bound on a hang, not on speed: some unit tests do seconds of CPU work (100,000 jobs, 10,000 records
          // under the TestClock), and `npm test` runs them beside real brokers on two cores.
          testTimeout: 60_000,
          hookTimeout: 60_000,
          include: ["test/**/*.test.ts", "examples/**/*.test.ts"],
          exclude: ["test/**/*.broker.test.ts", "test/**/*.cluster.test.ts"]
        }
      },
      {
        extends: true,
        test: {
          name: "broker",
          sequence: { groupOrder: 0 },
          include: ["test/**/*.broker.test.ts"],
          globalSetup: ["test/support/brokerSetup.ts"],
          testTimeout: 120_000,
          hookTimeout: 120_000
        }
      },
      {
        extends: true,
        test: {
          name: "broker:platformatic",
          sequence: { groupOrder: 0 },
          include: ["test/**/*.broker.test.ts"],
          exclude: ["test/contract/**", "test/scripts/**"],
          env: { KAFKA_CLIENT: "platformatic" },
          globalSetup: ["test/support/brokerSetup.ts"],
          testTimeout: 120_000,
          hookTimeout: 120_000
        }
      },
      {
        extends: true,
        test: {
          // A three-node cluster of its own per test (`npm run test:cluster`): leader failover and the like.
          name: "cluster",
          include: ["test/**/*.cluster.test.ts"],
          testTimeout: 300_000,
          hookTimeout: 300_000,
          // After the other projects when a single vitest run has them all (`npx vitest run`).
          sequence: { groupOrder: 1 }
        }
      }
    ]
  }
})
