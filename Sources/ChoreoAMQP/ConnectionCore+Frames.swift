import CRabbitMQ
import Foundation
import Logging

extension ConnectionCore {
    /// Dispatches one frame read outside a synchronous request: deliveries, confirms, returns, closes.
    func handle(frame: amqp_frame_t) {
        guard Int32(frame.frame_type) == CHOREO_FRAME_METHOD else {
            // Content frames are read together with their method; a stray one means we lost sync.
            logger.debug("ignoring stray frame", metadata: ["amqp.frame_type": "\(frame.frame_type)"])
            return
        }
        let method = frame.payload.method
        let id = frame.channel
        switch method.id {
        case CHOREO_BASIC_DELIVER:
            let d = method.decoded.assumingMemoryBound(to: amqp_basic_deliver_t.self).pointee
            handleDeliver(
                channel: id, consumerTag: CDecode.string(d.consumer_tag), deliveryTag: d.delivery_tag,
                redelivered: d.redelivered != 0, exchange: CDecode.string(d.exchange),
                routingKey: CDecode.string(d.routing_key))
        case CHOREO_BASIC_ACK:
            let a = method.decoded.assumingMemoryBound(to: amqp_basic_ack_t.self).pointee
            guard let channel = channels(id) else { return }
            settle(channel, channel.tracker.acked(deliveryTag: a.delivery_tag, multiple: a.multiple != 0))
        case CHOREO_BASIC_NACK:
            let n = method.decoded.assumingMemoryBound(to: amqp_basic_nack_t.self).pointee
            guard let channel = channels(id) else { return }
            settle(channel, channel.tracker.nacked(deliveryTag: n.delivery_tag, multiple: n.multiple != 0))
        case CHOREO_BASIC_RETURN:
            let r = method.decoded.assumingMemoryBound(to: amqp_basic_return_t.self).pointee
            let exchange = CDecode.string(r.exchange)
            let routingKey = CDecode.string(r.routing_key)
            let code = r.reply_code
            let text = CDecode.string(r.reply_text)
            guard readContent(channel: id, operation: "basic.return") != nil else { return }
            channels(id)?.tracker.returned(exchange: exchange, routingKey: routingKey, replyCode: code, replyText: text)
        case CHOREO_BASIC_CANCEL:
            let c = method.decoded.assumingMemoryBound(to: amqp_basic_cancel_t.self).pointee
            let tag = CDecode.string(c.consumer_tag)
            if let sink = removeConsumer(tag: tag, channel: id) {
                sink.buffer.finish(
                    throwing: AMQPError(
                        .consumerCancelled, message: "the broker cancelled consumer '\(tag)' (queue deleted or moved)",
                        operation: "consume"))
            }
        case CHOREO_CHANNEL_CLOSE:
            let c = method.decoded.assumingMemoryBound(to: amqp_channel_close_t.self).pointee
            let error = AMQPError(
                .channelClosed, replyCode: c.reply_code, message: CDecode.string(c.reply_text),
                operation: "channel \(id)")
            channelClosedByBroker(id, error: error)
        case CHOREO_CONNECTION_CLOSE:
            let c = method.decoded.assumingMemoryBound(to: amqp_connection_close_t.self).pointee
            let error = AMQPError(
                .connectionClosed, replyCode: c.reply_code, message: CDecode.string(c.reply_text),
                operation: "connection")
            if let state {
                var ok = amqp_connection_close_ok_t(dummy: 0)
                _ = amqp_send_method(state, 0, CHOREO_CONNECTION_CLOSE_OK, &ok)
            }
            fail(with: error)
        case CHOREO_CONNECTION_BLOCKED:
            let b = method.decoded.assumingMemoryBound(to: amqp_connection_blocked_t.self).pointee
            let reason = CDecode.string(b.reason)
            let why = reason.isEmpty ? "a resource alarm" : reason
            logger.warning(
                "the broker blocks publishing on this connection: \(why); publishes wait until the alarm clears (see the broker's log)"
            )
            blocked = true
            onBlocked?(reason)
        case CHOREO_CONNECTION_UNBLOCKED:
            blocked = false
            logger.notice("the broker accepts publishes on this connection again")
            onBlocked?(nil)
        case CHOREO_CHANNEL_FLOW:
            let f = method.decoded.assumingMemoryBound(to: amqp_channel_flow_t.self).pointee
            var ok = amqp_channel_flow_ok_t(active: f.active)
            if let state { _ = amqp_send_method(state, id, CHOREO_CHANNEL_FLOW_OK, &ok) }
        default:
            logger.debug("ignoring method", metadata: ["amqp.method": "\(method.id)", "amqp.channel": "\(id)"])
        }
    }

    private func channels(_ id: UInt16) -> ChannelState? {
        try? channelStateIfOpen(id)
    }

    private func settle(_ channel: ChannelState, _ settled: [ConfirmTracker.Settled]) {
        for s in settled {
            guard let completion = channel.completions.removeValue(forKey: s.token) else { continue }
            switch s.outcome {
            case .confirmed:
                completion(.success(()))
            case .nacked:
                completion(
                    .failure(
                        AMQPError(
                            .publishNacked, message: "the broker refused the message (basic.nack)",
                            operation: "")))
            case .returned(let code, let text):
                completion(
                    .failure(
                        AMQPError(
                            .unroutable, replyCode: code, message: "\(text): no queue is bound for it",
                            operation: "")))
            }
        }
    }

    /// Reads the header and body frames that follow a deliver or return.
    ///
    /// Frame by frame rather than with `amqp_read_message`, which copies the properties into a pool of its
    /// own (a 4 KiB calloc, and a free, per message) only for them to be decoded again here. The decoded
    /// properties live in the channel's frame pool, which is recycled after the whole delivery is handled.
    private func readContent(channel id: UInt16, operation: String) -> (AMQPProperties, Data)? {
        guard let state else { return nil }
        var frame = amqp_frame_t()
        guard nextFrame(state, channel: id, &frame, expecting: AMQP_FRAME_HEADER, operation),
            let decoded = frame.payload.properties.decoded
        else { return nil }
        let properties = CDecode.properties(
            decoded.assumingMemoryBound(to: amqp_basic_properties_t.self).pointee, recent: &recentStrings)
        let size = frame.payload.properties.body_size
        var body = Data()
        if size > 1, size <= 1 << 28 { body.reserveCapacity(Int(size)) }
        var received: UInt64 = 0
        while received < size {
            guard nextFrame(state, channel: id, &frame, expecting: AMQP_FRAME_BODY, operation) else { return nil }
            let fragment = frame.payload.body_fragment
            received += UInt64(fragment.len)
            guard received <= size else {
                fail(
                    with: AMQPError(
                        .protocolFailure, message: "a message body longer than its content header announced",
                        operation: operation))
                return nil
            }
            if received == size, body.isEmpty {
                body = CDecode.data(fragment)
            } else if let p = fragment.bytes {
                body.append(p.assumingMemoryBound(to: UInt8.self), count: fragment.len)
            }
        }
        return (properties, body)
    }

    /// The channel's next frame, which must be of type `type`; else the connection fails. Frames of other
    /// channels that come in between (the protocol allows it; RabbitMQ writes a message's frames together)
    /// are handled as they come: those of one channel stay in order.
    private func nextFrame(
        _ state: amqp_connection_state_t, channel id: UInt16, _ frame: inout amqp_frame_t, expecting type: Int32,
        _ operation: String
    ) -> Bool {
        while true {
            let status = amqp_simple_wait_frame(state, &frame)
            guard status == AMQP_STATUS_OK.rawValue else {
                fail(with: Self.error(status: status, operation: operation))
                return false
            }
            if frame.channel == id { break }
            handle(frame: frame)
            guard isLive else { return false }
        }
        guard frame.frame_type == UInt8(type) else {
            let expected = type == AMQP_FRAME_HEADER ? "header" : "body"
            fail(
                with: AMQPError(
                    .protocolFailure,
                    message: "expected a content \(expected) frame, got frame type \(frame.frame_type)",
                    operation: operation))
            return false
        }
        return true
    }

    private func handleDeliver(
        channel id: UInt16, consumerTag: String, deliveryTag: UInt64, redelivered: Bool,
        exchange: String, routingKey: String
    ) {
        guard let (properties, body) = readContent(channel: id, operation: "basic.deliver") else { return }
        guard let channel = channels(id) else { return }
        guard let sink = channel.consumers[consumerTag] else {
            // A delivery that raced a cancel. It stays unacknowledged and goes back to the queue when the
            // channel closes; rejecting it here would be a connection error on a stream (540 NOT_IMPLEMENTED).
            logger.debug(
                "delivery for a cancelled consumer left to requeue at channel close",
                metadata: ["amqp.consumer": "\(consumerTag)"])
            return
        }
        let delivery = AMQPDelivery(
            body: body, properties: properties, deliveryTag: deliveryTag, redelivered: redelivered,
            exchange: exchange, routingKey: routingKey, consumerTag: consumerTag,
            channel: sink.channel, generation: channel.generation)
        channel.deliveries.delivered(deliveryTag)
        sink.buffer.yield(delivery)
    }

    private func channelClosedByBroker(_ id: UInt16, error: AMQPError) {
        logger.debug("the broker closed a channel", metadata: ["amqp.channel": "\(id)", "amqp.error": "\(error)"])
        if let state {
            var ok = amqp_channel_close_ok_t(dummy: 0)
            _ = amqp_send_method(state, id, CHOREO_CHANNEL_CLOSE_OK, &ok)
        }
        markChannelClosed(id, reason: error)
    }
}
