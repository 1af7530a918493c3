import Tracing

/// Spans for swift-distributed-tracing, with the W3C trace context carried in the events' `traceparent` and
/// `tracestate` (CloudEvents' distributed-tracing extension; `tracestate` among the envelope's `extensions`).
///
/// Each handler invocation is a consumer span, `process <handler queue>`, whose parent is the span in the incoming
/// event's `traceparent`; the events it emits carry the invocation's span as theirs. ``EventPublisher`` makes a
/// producer span per publish, a child of the caller's current span. With no tracer bootstrapped (swift-distributed-
/// tracing's `NoOpTracer`) none of this runs, and an emitted event carries on its input's trace context.
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

    /// The trace context to put on an event whose parent is `context`'s span; nil when the tracer writes no
    /// `traceparent` (it is not a W3C tracer), and the event keeps what it had.
    func traceContext(for context: ServiceContext) -> TraceContext? {
        var carrier = TraceContext()
        tracer.inject(context, into: &carrier, using: TraceContextInjector())
        return carrier.traceparent == nil ? nil : carrier
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
        switch key {
        case WireNames.CloudEvents.traceparent: envelope.traceparent
        case WireNames.CloudEvents.tracestate: envelope.extensions[WireNames.CloudEvents.tracestate]
        default: nil
        }
    }
}

/// The W3C trace context an event carries: where a tracer writes it for an outgoing event, and what an emitted
/// event carries on from its input when nothing is traced. A tracer's other keys are dropped.
package struct TraceContext: Sendable {
    var traceparent: String?
    var tracestate: String?

    /// The input's, carried on.
    init(of envelope: EventEnvelope) {
        traceparent = envelope.traceparent
        tracestate = envelope.extensions.isEmpty ? nil : envelope.extensions[WireNames.CloudEvents.tracestate]
    }

    init() {}

    /// Puts this context on `envelope`, replacing its own.
    func apply(to envelope: inout EventEnvelope) {
        envelope.traceparent = traceparent
        if let tracestate {
            envelope.extensions[WireNames.CloudEvents.tracestate] = tracestate
        } else if !envelope.extensions.isEmpty {
            envelope.extensions[WireNames.CloudEvents.tracestate] = nil
        }
    }
}

struct TraceContextInjector: Injector {
    func inject(_ value: String, forKey key: String, into carrier: inout TraceContext) {
        switch key {
        case WireNames.CloudEvents.traceparent: carrier.traceparent = value
        case WireNames.CloudEvents.tracestate: carrier.tracestate = value
        default: break
        }
    }
}
