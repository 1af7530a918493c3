import Tracing

/// Spans for swift-distributed-tracing, with the W3C trace context carried in the events' `traceparent`
/// (CloudEvents' distributed-tracing extension).
///
/// Each handler invocation is a consumer span, `process <handler queue>`, whose parent is the span in the incoming
/// event's `traceparent`; the events it emits carry the invocation's span as theirs. ``EventPublisher`` makes a
/// producer span per publish, a child of the caller's current span. With no tracer bootstrapped (swift-distributed-
/// tracing's `NoOpTracer`) none of this runs, and an emitted event carries on its input's `traceparent`.
///
/// Only `traceparent` travels: the envelope has no `tracestate`, so a tracer's other keys are dropped.
struct EventTracing: Sendable {
    let tracer: any Tracer

    /// The tracer to use: `tracer`, else the bootstrapped one; nil when that traces nothing.
    init?(_ tracer: (any Tracer)?) {
        let resolved = tracer ?? InstrumentationSystem.tracer
        if resolved is NoOpTracer { return nil }
        self.tracer = resolved
    }

    /// The context an event carries: its span, as the parent of whatever handles it.
    func context(of envelope: EventEnvelope) -> ServiceContext {
        var context = ServiceContext.topLevel
        tracer.extract(envelope, into: &context, using: EnvelopeExtractor())
        return context
    }

    /// The `traceparent` to put on an event whose parent is `context`'s span; nil when the tracer writes none.
    func traceparent(for context: ServiceContext) -> String? {
        var carrier = TraceparentCarrier()
        tracer.inject(context, into: &carrier, using: TraceparentInjector())
        return carrier.traceparent
    }

    /// Attributes of OpenTelemetry's messaging conventions, and CloudEvents', that a span of `envelope` carries.
    static func describe(_ envelope: EventEnvelope, in span: any Span) {
        span.attributes["messaging.system"] = "rabbitmq"
        span.attributes["messaging.message.id"] = envelope.id
        span.attributes["messaging.rabbitmq.destination.routing_key"] = envelope.type
        if let correlation = envelope.correlationID {
            span.attributes["messaging.message.conversation_id"] = correlation
        }
        span.attributes["cloudevents.event_id"] = envelope.id
        span.attributes["cloudevents.event_type"] = envelope.type
        span.attributes["cloudevents.event_source"] = envelope.source
        if let subject = envelope.subject { span.attributes["cloudevents.event_subject"] = subject }
    }
}

/// Reads the trace context of an incoming event.
struct EnvelopeExtractor: Extractor {
    func extract(key: String, from envelope: EventEnvelope) -> String? {
        key == WireNames.CloudEvents.traceparent ? envelope.traceparent : nil
    }
}

/// Where a tracer writes the trace context of an outgoing event.
struct TraceparentCarrier: Sendable {
    var traceparent: String?
}

struct TraceparentInjector: Injector {
    func inject(_ value: String, forKey key: String, into carrier: inout TraceparentCarrier) {
        if key == WireNames.CloudEvents.traceparent { carrier.traceparent = value }
    }
}
