import * as InMemoryKafka from "../../src/InMemoryKafka.ts"
import { contractSuite } from "./contract.ts"

contractSuite("InMemoryKafka", () => InMemoryKafka.layer(), { heartbeats: "background", realBroker: false })
