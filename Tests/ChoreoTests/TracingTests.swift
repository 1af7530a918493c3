import ChoreoAMQP
import Foundation
import InMemoryTracing
import TestEvents
import Testing
import Tracing

@testable import Choreo

/// swift-distributed-tracing's in-memory tracer with W3C-shaped ids, its context carried as `traceparent` as a
/// W3C tracer (swift-otel's) does; the in-memory tracer's own keys are not W3C's.
struct W3CInMemoryTracer: Tracer {
    let inner = InMemoryTracer(
        idGenerator: .init(nextTraceID: { randomHex(16) }, nextSpanID: { randomHex(8) }))

    func startSpan<Instant: TracerInstant>(
        _ operationName: String, context: @autoclosure () -> ServiceContext, ofKind kind: SpanKind,
        at instant: @autoclosure () -> Instant, function: String, file fileID: String, line: UInt
    ) -> InMemorySpan {
        inner.startSpan(
            operationName, context: context(), ofKind: kind, at: instant(), function: function, file: fileID,
            line: line)
    }

    func forceFlush() { inner.forceFlush() }

    func inject<Carrier, Inject: Injector>(
        _ context: ServiceContext, into carrier: inout Carrier, using injector: Inject
    )
    where Carrier == Inject.Carrier {
        guard let span = context.inMemorySpanContext else { return }
        injector.inject("00-\(span.traceID)-\(span.spanID)-01", forKey: "traceparent", into: &carrier)
        injector.inject("vendor=\(span.spanID)", forKey: "tracestate", into: &carrier)
        injector.inject("other", forKey: "in-memory-trace-id", into: &carrier)
    }

    func extract<Carrier, Extract: Extractor>(
        _ carrier: Carrier, into context: inout ServiceContext, using extractor: Extract
    ) where Carrier == Extract.Carrier {
        guard let parts = extractor.extract(key: "traceparent", from: carrier)?.split(separator: "-"), parts.count == 4
        else { return }
        context.inMemorySpanContext = InMemorySpanContext(
            traceID: String(parts[1]), spanID: String(parts[2]), parentSpanID: nil)
    }

    /// The finished span named `name`, with its trace and span ids.
    func finished(_ name: String) -> [FinishedInMemorySpan] { inner.finishedSpans.filter { $0.operationName == name } }
}

func randomHex(_ bytes: Int) -> String {
    (0..<bytes).map { _ in String(format: "%02x", UInt8.random(in: 0...255)) }.joined()
}

@Suite("Tracing", .serialized, .timeLimit(.minutes(2)))
struct TracingTests {
    @Test(
        "an invocation is a consumer span under the event's traceparent; its emits carry that span, a failure is recorded"
    )
    func invocationSpans() async throws {
        let mesh = try Mesh()
        let (connection, channel) = try await mesh.connect()
        defer { Task { await connection.close() } }
        let pongs = try await mesh.pongQueue(on: channel)

        let tracer = W3CInMemoryTracer()
        let config = mesh.pingConfiguration()
        let runtime = try ChoreoRuntime(
            configuration: config, handlers: [ScriptedPing(runs: RunCounts())], tracer: tracer)
        let running = await started(runtime)

        // A producer's publish, traced: the event carries the producer span.
        let publisher = try await EventPublisher.connect(
            url: Broker.url, exchange: mesh.exchange, source: "test", tracer: tracer)
        let good = try await publisher.publish(Ping(n: 1))
        let poisoned = try await publisher.publish(Ping(n: 2, poison: true))
        await publisher.close()

        let name = "process \(mesh.pingQueues.main)"
        let spans = await eventually({ tracer.finished(name) }, until: { $0.count == 2 })
        #expect(spans.count == 2)
        let publishes = tracer.finished("publish \(Ping.eventType)")
        #expect(publishes.count == 2 && publishes.allSatisfy { $0.kind == .producer && $0.parentSpanID == nil })
        for span in spans {
            #expect(span.kind == .consumer)
            let id = span.attributes["cloudevents.event_id"]?.toSpanAttribute()
            let producer = try #require(
                publishes.first { $0.attributes["cloudevents.event_id"]?.toSpanAttribute() == id })
            #expect(span.traceID == producer.traceID && span.parentSpanID == producer.spanID, "a child of the publish")
            #expect(span.attributes["choreo.handler"]?.toSpanAttribute() == .string("ping"))
            #expect(span.attributes["messaging.destination.name"]?.toSpanAttribute() == .string(mesh.pingQueues.main))
        }
        let ok = try #require(spans.first { $0.attributes["cloudevents.event_id"]?.toSpanAttribute() == .string(good) })
        #expect(ok.status == nil && ok.errors.isEmpty)
        let failed = try #require(
            spans.first { $0.attributes["cloudevents.event_id"]?.toSpanAttribute() == .string(poisoned) })
        #expect(failed.status?.code == .error && failed.status?.message == "Refused")
        #expect(failed.errors.count == 1)

        // The pong the handler emitted carries the invocation's span as its parent-to-be.
        let pong = try #require(try await peek(queue: pongs, expecting: 1, connection: connection).first)
        let traceparent = pong.properties.headers?["cloudEvents_traceparent"]?.stringValue
        #expect(traceparent == "00-\(ok.traceID)-\(ok.spanID)-01")
        #expect(pong.properties.headers?["cloudEvents_tracestate"]?.stringValue == "vendor=\(ok.spanID)")
        #expect(pong.properties.headers?["cloudEvents_in-memory-trace-id"] == nil, "a tracer's other keys are dropped")

        runtime.beginShutdown()
        try await running.value
        try await channel.deleteQueue(pongs)
    }

    @Test("with no tracer, an emitted event carries on its input's traceparent and tracestate unchanged")
    func untracedPassesTraceparentOn() async throws {
        let mesh = try Mesh()
        let (connection, channel) = try await mesh.connect()
        defer { Task { await connection.close() } }
        let pongs = try await mesh.pongQueue(on: channel)
        let config = mesh.pingConfiguration()
        let runtime = try ChoreoRuntime(configuration: config, handlers: [ScriptedPing(runs: RunCounts())])
        let running = await started(runtime)

        let parent = "00-\(randomHex(16))-\(randomHex(8))-01"
        var envelope = try EventEnvelope(Ping(n: 1), source: "test", id: UUID().uuidString.lowercased())
        envelope.traceparent = parent
        envelope.extensions["tracestate"] = "vendor=abc,other=1"
        try await channel.publish(EnvelopeCodec.encode(envelope, exchange: mesh.exchange))
        let pong = try #require(try await peek(queue: pongs, expecting: 1, connection: connection).first)
        #expect(pong.properties.headers?["cloudEvents_traceparent"]?.stringValue == parent)
        #expect(pong.properties.headers?["cloudEvents_tracestate"]?.stringValue == "vendor=abc,other=1")

        runtime.beginShutdown()
        try await running.value
        try await channel.deleteQueue(pongs)
    }
}
