"""The autograd shared by the fused-loss custom ops (region loss, bootstrapping/MRKLD) of every
backend: the gradient is made in the forward pass, the backward scales it."""


def register_fused_loss_op(op, fake, num_inputs: int, public_name: str) -> None:
    """Give a fused-loss custom op (outputs: values whose [0] is the loss, and the gradient of
    that loss with respect to input 0, made in the forward pass when its last input,
    compute_grad, is set) its fake kernel and autograd formula: the backward scales the saved
    gradient by the incoming one. Only input 0 (the logits) gets a gradient."""
    def setup_context(ctx, inputs, output):
        ctx.logits_dtype = inputs[0].dtype
        ctx.has_grad = inputs[-1]
        ctx.save_for_backward(output[1])

    def backward(ctx, grad_values, _grad_of_grad):
        if not ctx.has_grad:
            raise RuntimeError(f"{op}: the forward ran with compute_grad=False, so there is no gradient "
                               f"to return; call the public {public_name}, which sets it")
        (grad,) = ctx.saved_tensors
        return ((grad * grad_values[0]).to(ctx.logits_dtype),) + (None,) * (num_inputs - 1)

    op.register_fake(fake)
    op.register_autograd(backward, setup_context=setup_context)
