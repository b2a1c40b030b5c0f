// Gradient buckets: the gradients of many parameters copied into one flat buffer so that a single allreduce
// averages them all, and copied back afterwards. Compiled at run time by NVRTC (hytrain-cuda, kernels.rs); the CPU
// reference is hytrain_cuda::reference::{pack, unpack}, which walks the elements in the same way. Change both
// together.
//
// A bucket's layout is `offsets`: n_tensors + 1 prefix sums of the tensors' element counts (offsets[0] == 0,
// offsets[n_tensors] == the bucket's length). Tensor t occupies bucket[offsets[t] .. offsets[t + 1]].

// The tensor holding bucket element i: the last t with offsets[t] <= i, so empty tensors (offsets[t] ==
// offsets[t + 1]) are passed over. Binary search: a bucket may hold thousands of small tensors.
__device__ __forceinline__ int hytrain_tensor_of(const long long* offsets, int n_tensors, long long i)
{
    int lo = 0;
    int hi = n_tensors - 1;
    while (lo < hi) {
        int mid = (lo + hi + 1) / 2;
        if (offsets[mid] <= i) {
            lo = mid;
        } else {
            hi = mid - 1;
        }
    }
    return lo;
}

// bucket[i] = grads[t][i - offsets[t]] * scale for every element. `scale` folds in 1/world_size (averaging as a
// sum) or a loss-scale division, saving a pass over the bucket.
extern "C" __global__ void hytrain_pack_scaled(const float* const* grads, const long long* offsets, int n_tensors,
                                               float scale, float* bucket)
{
    long long total = offsets[n_tensors];
    long long stride = (long long)gridDim.x * blockDim.x;
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < total; i += stride) {
        int t = hytrain_tensor_of(offsets, n_tensors, i);
        bucket[i] = grads[t][i - offsets[t]] * scale;
    }
}

// grads[t][i - offsets[t]] = bucket[i] * scale: the reduced bucket back into the parameters' gradients.
extern "C" __global__ void hytrain_unpack_scaled(const float* bucket, const long long* offsets, int n_tensors,
                                                 float scale, float* const* grads)
{
    long long total = offsets[n_tensors];
    long long stride = (long long)gridDim.x * blockDim.x;
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < total; i += stride) {
        int t = hytrain_tensor_of(offsets, n_tensors, i);
        grads[t][i - offsets[t]] = bucket[i] * scale;
    }
}
