import CFlashAttention
import FlashAttentionCore

/// Backward params made into a `BackwardProblem`: the forward's params validated as for a forward call, its out
/// and lse as inputs, the gradients as outputs that alias nothing.

extension BackwardProblem {
    /// Validates backward params: the forward params as for a forward call (dense, or varlen when
    /// cu_seqlens_q is set), their out and lse as inputs, and the gradients as outputs that overlap
    /// nothing else.
    static func validated(_ params: flash_attention_backward_params) throws(FlashAttentionError) -> (
        BackwardProblem, ForwardOptions
    ) {
        guard let forwardParams = params.forward else { throw .nullPointer("forward is NULL") }
        let widened = try widen(forwardParams)
        let entry: Entry = widened.cu_seqlens_q != nil ? .varlen : .dense
        if entry == .varlen && widened.block_table != nil {
            throw .unsupported("forward->block_table is set: the backward takes contiguous varlen keys, not a paged cache")
        }
        let (problem, options, _, forwardTensors) = try AttentionProblem.validated(widened, entry: entry)
        let p = widened
        let qElements = problem.batch * problem.seqlenQ * problem.headsQ
        if qElements > 0 && p.lse == nil {
            throw .nullPointer("forward->lse is NULL; the backward pass needs the forward's log-sum-exp")
        }
        let qType = ElementType(rawValue: p.dtype) ?? .float32, kvType = ElementType(rawValue: p.kv_dtype) ?? .float32
        let tensorBatch = entry == .varlen ? 1 : problem.batch
        let varlen = entry == .varlen
        let dout = tensor4("dout", params.dout, qType, tensorBatch, problem.seqlenQ, problem.headsQ, problem.headDimV,
                           params.dout_batch_stride, params.dout_row_stride, params.dout_head_stride, params.dout_dim_stride,
                           ("dout_batch_stride", "dout_row_stride", "dout_head_stride", "dout_dim_stride"), ignoreBatch: varlen)
        let dq = tensor4("dq", UnsafeRawPointer(params.dq), qType, tensorBatch, problem.seqlenQ, problem.headsQ, problem.headDim,
                         params.dq_batch_stride, params.dq_row_stride, params.dq_head_stride, params.dq_dim_stride,
                         ("dq_batch_stride", "dq_row_stride", "dq_head_stride", "dq_dim_stride"), ignoreBatch: varlen)
        let dk = tensor4("dk", UnsafeRawPointer(params.dk), kvType, tensorBatch, problem.seqlenK, problem.headsKV, problem.headDim,
                         params.dk_batch_stride, params.dk_row_stride, params.dk_head_stride, params.dk_dim_stride,
                         ("dk_batch_stride", "dk_row_stride", "dk_head_stride", "dk_dim_stride"), ignoreBatch: varlen)
        let dv = tensor4("dv", UnsafeRawPointer(params.dv), kvType, tensorBatch, problem.seqlenK, problem.headsKV, problem.headDimV,
                         params.dv_batch_stride, params.dv_row_stride, params.dv_head_stride, params.dv_dim_stride,
                         ("dv_batch_stride", "dv_row_stride", "dv_head_stride", "dv_dim_stride"), ignoreBatch: varlen)
        for t in [dout, dq, dk, dv] { try checkDimStride(t) }
        let doutRange = try dout.validate()
        let dqRange = try dq.validate(), dkRange = try dk.validate(), dvRange = try dv.validate()
        let dsinks: TensorArgument? = params.dsinks.map { TensorArgument("dsinks", UnsafeRawPointer($0), count: problem.headsQ) }
        let dsinksRange = try dsinks?.validate()
        for (output, range) in [(dq, dqRange), (dk, dkRange), (dv, dvRange)] where range != nil {
            try output.validateNoSelfOverlap()
        }
        // The gradients overlap no input and no other gradient.
        let outputs: [(String, AddressRange?)] = [("dq", dqRange), ("dk", dkRange), ("dv", dvRange), ("dsinks", dsinksRange)]
        let inputs = forwardTensors.named + [("dout", doutRange)]
        for (i, (name, range)) in outputs.enumerated() {
            guard let range else { continue }
            for (other, otherRange) in inputs where range.overlaps(otherRange) {
                throw .invalidArgument("\(name) overlaps \(other); gradients must not alias inputs")
            }
            for (other, otherRange) in outputs[(i + 1)...] where range.overlaps(otherRange) {
                throw .invalidArgument("\(name) overlaps \(other); gradients must not alias each other")
            }
        }
        let backward = BackwardProblem(
            forward: problem, dout: view(dout, doutRange, qType), dq: view(dq, dqRange, qType),
            dk: view(dk, dkRange, kvType), dv: view(dv, dvRange, kvType),
            dsinks: problem.sinks == nil || dsinksRange == nil ? nil : params.dsinks)
        return (backward, options)
    }
}
