// Fused optimizer steps over flat buckets (parameters, gradients and optimizer state laid out alike), one thread
// per element. Each follows the arithmetic of PyTorch's single-tensor implementation of the optimizer; the CPU
// reference is hytrain_cuda::reference::{sgd_momentum_step, adamw_step}, operation for operation, so that a GPU
// result compiled without FMA contraction (--fmad=false) equals it exactly. Change both together.
//
// Scalars that depend only on the step (learning rate products, bias corrections) are computed on the host in
// double precision and passed as float, as PyTorch does with its Python-float hyperparameters.

// torch.optim.SGD with momentum, dampening, weight decay and Nesterov. On the first step the momentum buffer starts
// as the gradient itself.
extern "C" __global__ void hytrain_sgd_momentum(float* params, const float* grads, float* momentum_buf, long long n,
                                                float lr, float momentum, float dampening, float weight_decay,
                                                int nesterov, int first_step)
{
    long long stride = (long long)gridDim.x * blockDim.x;
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += stride) {
        float p = params[i];
        float g = grads[i];
        if (weight_decay != 0.0f) {
            g = g + weight_decay * p;
        }
        if (momentum != 0.0f) {
            float b;
            if (first_step) {
                b = g;
            } else {
                b = momentum * momentum_buf[i] + (1.0f - dampening) * g;
            }
            momentum_buf[i] = b;
            g = nesterov ? g + momentum * b : b;
        }
        params[i] = p - lr * g;
    }
}

// torch.optim.AdamW (amsgrad off): decoupled weight decay, then Adam with bias correction.
//   decay = 1 - lr * weight_decay, step_size = lr / (1 - beta1^step), bias_correction2_sqrt = sqrt(1 - beta2^step)
// exp_avg moves towards the gradient with torch.lerp's formula (weight = 1 - beta1).
extern "C" __global__ void hytrain_adamw(float* params, const float* grads, float* exp_avg, float* exp_avg_sq,
                                         long long n, float decay, float one_minus_beta1, float beta2,
                                         float one_minus_beta2, float eps, float step_size,
                                         float bias_correction2_sqrt)
{
    long long stride = (long long)gridDim.x * blockDim.x;
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += stride) {
        float g = grads[i];
        float p = params[i] * decay;
        float m = exp_avg[i];
        if (fabsf(one_minus_beta1) < 0.5f) {
            m = m + one_minus_beta1 * (g - m);
        } else {
            m = g - (g - m) * (1.0f - one_minus_beta1);
        }
        float v = exp_avg_sq[i] * beta2 + one_minus_beta2 * g * g;
        float denom = sqrtf(v) / bias_correction2_sqrt + eps;
        exp_avg[i] = m;
        exp_avg_sq[i] = v;
        params[i] = p - step_size * (m / denom);
    }
}
