#include "train/executor.hpp"

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstring>
#include <limits>
#include <numeric>
#include <optional>

#include "allocator/caching_allocator.hpp"
#include "core/clock.hpp"
#include "core/errors.hpp"
#include "core/units.hpp"
#include "device/host_memory.hpp"
#include "device/sim_device.hpp"
#include "graph/device_model.hpp"
#include "graph/liveness.hpp"
#include "graph/planner.hpp"
#include "train/predict.hpp"

namespace spill::train {
namespace {

using Clock = std::chrono::steady_clock;

double seconds_since(Clock::time_point t) {
  return std::chrono::duration<double>(Clock::now() - t).count();
}

// The GPU preset whose roofline times the kernels: the simulated device is modelled on an
// A100; on a GPU the preset only seeds the first plan (measured times replace it).
const graph::GpuModel& roofline_model(const Device& dev) {
  const std::string& n = dev.info().name;
  if (dev.info().simulated) return graph::gpu_preset("a100-40gb");
  if (n.find("H200") != std::string::npos) return graph::gpu_preset("h200");
  if (n.find("H100") != std::string::npos) return graph::gpu_preset("h100-sxm");
  if (n.find("A100") != std::string::npos) return graph::gpu_preset("a100-80gb");
  if (n.find("V100") != std::string::npos) return graph::gpu_preset("v100-16gb");
  return graph::gpu_preset("a100-40gb");
}

}  // namespace

const char* to_string(Policy p) {
  switch (p) {
    case Policy::Graph: return "graph";
    case Policy::Plan: return "plan";
    case Policy::Lru: return "lru";
    case Policy::None: return "none";
  }
  return "?";
}

Policy parse_policy(std::string_view s) {
  if (s == "graph") return Policy::Graph;
  if (s == "plan") return Policy::Plan;
  if (s == "lru") return Policy::Lru;
  if (s == "none") return Policy::None;
  throw InvalidArgument("unknown policy '" + std::string(s) + "' (graph, plan, lru or none)");
}

SwapPolicy runtime_policy(Policy p) {
  switch (p) {
    case Policy::Plan: return SwapPolicy::Plan;
    case Policy::None: return SwapPolicy::None;
    case Policy::Graph:
    case Policy::Lru: return SwapPolicy::Lru;
  }
  return SwapPolicy::Lru;
}

bool block_fits_graph(std::uint64_t block, bool large, std::uint64_t graph_bytes,
                      std::uint64_t small_limit) {
  if (large != (graph_bytes > small_limit)) return false;
  if (!large) return block == graph_bytes;
  return block >= graph_bytes && block <= largest_reused_block(graph_bytes);
}

std::uint64_t allocation_bytes(std::uint64_t bytes, const Config& config, const Device& device) {
  return mapped_bytes(bytes, device.granularity(), small_limit_for(config.swap_threshold));
}

struct Executor::Impl {
  Impl(Runtime& r, const Program& prog, const ExecOptions& opt)
      : rt(r), p(prog), o(opt), dev(r.device()), alloc(r.allocator()), swp(r.swapper()) {}

  Runtime& rt;
  const Program& p;
  ExecOptions o;
  Device& dev;
  CachingAllocator& alloc;
  Swapper* swp;
  kernels::Roofline roofline;
  std::unique_ptr<kernels::Kernels> k;
  Stream stream = nullptr;
  Stream aux = nullptr;  // reads the loss back without holding up the compute stream
  Event t0 = nullptr, t1 = nullptr, loss_ready = nullptr;
  Event uploaded = nullptr;  // the step's inputs are on the device
  std::vector<Event> done, start;  // per op: end of its kernels; start (measured steps)
  graph::Graph g;
  graph::Plan plan;
  graph::SimResult pred;
  std::optional<graph::SwapFloor> floor;
  LinkModel link = link_preset("pcie4");
  graph::PlannerOptions po;             // po.budget: the budget less the small-pool reserve
  std::uint64_t budget = 0, small_reserve = 0, unswapped_peak = 0;
  std::uint64_t footprint = 0;
  std::vector<void*> ptrs;
  std::vector<char> swappable, checked;  // swappable: large blocks the planner may move
  std::uint64_t small_limit = 0;
  std::vector<std::vector<TensorId>> allocs, frees, uses;
  std::vector<std::vector<char>> wrote;
  std::vector<TensorId> inputs;
  std::vector<std::int64_t> maker;  // per tensor: the op that remakes it (graph::remaking_op)
  std::vector<void*> staging;  // pinned host buffers of the inputs
  float* loss_host = nullptr;
  std::size_t loss_op = 0;
  int steps_done = 0;
  // Where a step is, for its errors (audit 40a #8): the op running (-1: the inputs' upload,
  // -2: the step's end), and the tensor being allocated or pinned (-1: none).
  std::ptrdiff_t at_op = -2, at_tensor = -1;
  double spill_s = 0, spill_cpu_s = 0, spill_vmm_cpu_s = 0;
  SwapStats setup_swaps;  // what setting up moved (Executor::setup_swaps)

  template <class F>
  void timed(F&& f) {
    const auto t = Clock::now();
    const double c = thread_cpu_s();
    const double v = Device::thread_vmm_cpu_s();
    f();
    spill_cpu_s += thread_cpu_s() - c;
    spill_vmm_cpu_s += Device::thread_vmm_cpu_s() - v;
    spill_s += seconds_since(t);
  }

  void* allocate(TensorId t) {
    void* ptr = nullptr;
    const std::uint64_t bytes = p.tensors[t].bytes;
    // Named as the graph names the tensor: snapshots, the report's top allocations and
    // out-of-memory messages then say which tensor a block is.
    at_tensor = std::ptrdiff_t(t);
    timed([&] {
      ptr = alloc.allocate(bytes, stream);
      alloc.set_block_name(ptr, p.tensors[t].name);
    });
    at_tensor = -1;
    ptrs[t] = ptr;
    if (!checked[t]) {  // the graph's size and pool are what the allocator gave
      std::optional<BlockInfo> info = alloc.block_info(ptr);
      if (!info || !block_fits_graph(info->size, info->large, g.tensors[t].bytes, small_limit))
        throw Error("executor: tensor '" + p.tensors[t].name + "' got a block of " +
                    (info ? format_bytes(info->size) : std::string("?")) + ", the graph says " +
                    format_bytes(g.tensors[t].bytes));
      checked[t] = 1;
    }
    return ptr;
  }
  void free(TensorId t) {
    timed([&] { alloc.deallocate(ptrs[t], stream); });
    ptrs[t] = nullptr;
  }
  void pin(TensorId t) {
    at_tensor = std::ptrdiff_t(t);
    if (swappable[t]) timed([&] { swp->pin(ptrs[t], stream); });
    at_tensor = -1;
  }
  void unpin(TensorId t, bool wrote_it) {
    if (swappable[t]) timed([&] { swp->unpin(ptrs[t], stream, wrote_it); });
  }

  // The prediction simulates the memory the allocator maps: the whole budget, small tensors as
  // the segments they fill (the plan keeps room for the segments of their peak throughout; the
  // forward pass of a small gpt-mini needs one segment less, so its steps ran faster than
  // predicted with the plan's budget); and the swapper's lazy completion of swap-outs: a planned
  // prefetch of a block whose swap-out nothing has reaped keeps it (no copy back).
  graph::SimOptions prediction_options() const {
    return train::prediction_options(budget, po.model, small_limit);
  }

  // Remakes tensor t (dropped by the plan) before the op that needs it: a fresh block, then its
  // producer's code again with the producer's tensors pinned. The producer's other outputs are
  // rewritten with the bytes they hold (deterministic kernels, unchanged reads): not dirtied.
  void remake(TensorId t, const OpContext& ctx, StepStats& r) {
    const std::size_t m = std::size_t(maker[t]);
    allocate(t);
    for (TensorId u : uses[m]) pin(u);
    if (o.poison) k->fill(stream, static_cast<float*>(ptrs[t]), std::nanf(""), p.tensors[t].bytes / 4);
    p.ops[m].run(ctx);
    for (TensorId u : uses[m]) unpin(u, u == t);
    ++r.recomputes;
    r.recomputed_bytes += g.tensors[t].bytes;
  }

  // "step N, op 'name', tensor 'x': " for an error in the step.
  std::string where() const {
    std::string w = "step " + std::to_string(steps_done + 1) + ", ";
    if (at_op >= 0) w += "op " + std::to_string(at_op) + " '" + p.ops[std::size_t(at_op)].name + "'";
    else w += at_op == -1 ? "the inputs' upload" : "its end";
    if (at_tensor >= 0) w += ", tensor '" + p.tensors[std::size_t(at_tensor)].name + "'";
    return w + ": ";
  }

  void setup();
  void make_plan(const std::vector<double>* measured);
  void check_host_memory() const;
  StepStats step();
  std::vector<std::byte> read(TensorId t);
};

void Executor::Impl::setup() {
  const Config& conf = rt.config();
  const SwapPolicy want = runtime_policy(o.policy);
  SPILL_EXPECTS(conf.policy == want,
                std::string("executor: policy ") + to_string(o.policy) + " needs the runtime's " +
                    "policy:" + spill::to_string(want) + ", not policy:" + spill::to_string(conf.policy));
  if (o.lag <= 0) o.lag = dev.info().simulated ? 1 : kGpuLag;
  if (!o.wait_every_op) o.wait_every_op = dev.info().simulated;
  if (o.policy == Policy::Plan || o.policy == Policy::Lru) o.wait_every_op = true;
  if (!dev.info().simulated) o.measure_ops = true;
  roofline = make_roofline(roofline_model(dev));
  k = kernels::make_kernels(dev, {roofline});
  if (const auto* sim = dynamic_cast<const SimDevice*>(&dev)) {
    link = sim->options().link;    // what its copies follow, link_gbps included
    link.duplex_efficiency = 1.0;  // its two copy engines do not contend (docs/architecture.md)
  } else {
    try {
      link = link_preset(dev.info().link_name);
    } catch (const InvalidArgument&) {
      // Keep pcie4, as the runtime does for a link it has no model of.
    }
  }
  small_limit = small_limit_for(conf.swap_threshold);
  budget = alloc.budget();
  po.budget = budget;
  po.min_swap_bytes = min_movable_request(conf.swap_threshold, dev.granularity());
  po.recompute = o.recompute && o.policy == Policy::Graph;
  make_plan(nullptr);
  if (o.policy == Policy::Graph) check_host_memory();

  const std::size_t nt = p.tensors.size(), no = p.ops.size();
  ptrs.assign(nt, nullptr);
  swappable.assign(nt, 0);
  checked.assign(nt, 0);
  allocs.assign(no, {});
  frees.assign(no, {});
  uses.assign(no, {});
  wrote.assign(no, {});
  graph::Liveness live = graph::analyze_liveness(g);
  for (std::size_t t = 0; t < nt; ++t) {
    swappable[t] = swp != nullptr && g.tensors[t].bytes >= po.min_swap_bytes;
    const auto& u = live.uses[t];
    if (u.empty()) continue;
    const graph::TensorKind kind = p.tensors[t].kind;
    if (!graph::exists_at_start(kind)) allocs[u.front()].push_back(TensorId(t));
    if (!graph::persistent(kind)) frees[u.back()].push_back(TensorId(t));
    if (kind == graph::TensorKind::Input) inputs.push_back(TensorId(t));
  }
  for (std::size_t i = 0; i < no; ++i) {
    const OpSpec& op = p.ops[i];
    for (const auto* list : {&op.reads, &op.writes})
      for (TensorId t : *list)
        if (std::find(uses[i].begin(), uses[i].end(), t) == uses[i].end()) uses[i].push_back(t);
    for (TensorId t : uses[i])
      wrote[i].push_back(std::find(op.writes.begin(), op.writes.end(), t) != op.writes.end());
    if (std::find(op.writes.begin(), op.writes.end(), p.loss) != op.writes.end()) loss_op = i;
  }

  stream = dev.create_stream();
  aux = dev.create_stream();
  loss_ready = dev.create_event();
  uploaded = dev.create_event();
  t0 = dev.create_event(true);
  t1 = dev.create_event(true);
  for (std::size_t i = 0; i < no; ++i) {
    done.push_back(dev.create_event(o.measure_ops));
    if (o.measure_ops) start.push_back(dev.create_event(true));
  }
  loss_host = static_cast<float*>(dev.allocate_host(64));
  for (TensorId t : inputs) staging.push_back(dev.allocate_host(p.tensors[t].bytes));

  // Weights and optimizer state, initialised from the host. A step following the plan starts
  // with some of them on the host: each goes there as soon as it is written, so that setting
  // up stays within the budget without evicting anything the plan wants resident.
  std::vector<char> on_host(nt, 0);
  if (o.policy == Policy::Graph)
    for (graph::TensorIndex t : plan.start_on_host) on_host[t] = 1;
  std::vector<std::byte> host;
  const SwapStats swaps0 = swp ? swp->stats() : SwapStats{};
  for (std::size_t t = 0; t < nt; ++t) {
    if (!graph::persistent(p.tensors[t].kind)) continue;
    host.resize(p.tensors[t].bytes);
    p.initial_value(TensorId(t), host);
    allocate(TensorId(t));
    pin(TensorId(t));
    dev.copy_async(ptrs[t], host.data(), host.size(), CopyKind::HostToDevice, stream);
    unpin(TensorId(t), true);
    dev.synchronize(stream);
    if (on_host[t]) swp->evict(ptrs[t]);
  }
  if (swp) setup_swaps = swaps_since(swp->stats(), swaps0);
}

// The pinned host memory the plan needs at once (the prediction's host peak: every block's
// buffer from its first copy out until the block is freed, as the swapper keeps it) is a lower
// bound of what the run pins: a host_cap or a host with less fails before anything runs rather
// than in step 1 (audit 40a #7).
void Executor::Impl::check_host_memory() const {
  const std::uint64_t need = pred.peak_host_bytes;
  const std::string plan_needs = "the plan for '" + p.name + "' at a budget of " +
                                 format_bytes(budget) + " keeps up to " + format_bytes(need) +
                                 " of its tensors in pinned host memory at once";
  if (const auto cap = rt.config().host_cap; cap && need > *cap)
    throw InvalidArgument("host_cap " + format_bytes(*cap) + " is too small: " + plan_needs +
                          " (raise host_cap:, or the budget so that less is swapped)");
  const auto* sim = dynamic_cast<const SimDevice*>(&dev);
  const HostMemoryInfo host = read_host_memory(sim ? sim->options().host_memory : HostMemorySources{});
  if (need > pinnable_room(host))
    SPILL_FAIL_HOST_CAP(plan_needs + ", more than this host can pin now: " +
                        format_bytes(host.available) + " available (" + host.describe() +
                        ") less a reserve of " + format_bytes(pinning_reserve(host)) +
                        " for everything else. A larger budget swaps less");
}

graph::Graph step_graph(Runtime& runtime, const Program& program) {
  const kernels::Roofline roofline = make_roofline(roofline_model(runtime.device()));
  std::unique_ptr<kernels::Kernels> k = kernels::make_kernels(runtime.device(), {roofline});
  auto sizes = [&](std::uint64_t b) {
    return allocation_bytes(b, runtime.config(), runtime.device());
  };
  return to_graph(program, *k, roofline, sizes);
}

void Executor::Impl::make_plan(const std::vector<double>* measured) {
  auto sizes = [this](std::uint64_t b) { return allocation_bytes(b, rt.config(), dev); };
  g = to_graph(p, *k, roofline, sizes, measured);
  const graph::Liveness live = graph::analyze_liveness(g);
  footprint = live.peak;
  // Predict the steady state: a step starts with the previous one's copies in flight, and
  // uploads its inputs first, as step() does (the same inputs, in tensor order).
  po.model = steady_state(p, g);
  // Small tensors live in segments of the allocator's small pool (never swapped): the plan
  // keeps room for the segments the allocator keeps mapped for them beyond their bytes, as it
  // places them (train/small_pool.hpp; whole-segment rounding of their peak undercounted it:
  // audit 40a #1); and the allocator maps whole granules: a budget's last part granule can
  // never hold a block (planner_budget).
  const PlannerBudget shares = planner_budget(g, budget, dev.granularity(), small_limit);
  const std::uint64_t mappable = shares.mappable;
  unswapped_peak = shares.unswapped_peak;
  small_reserve = shares.small_reserve;
  po.budget = shares.planner;
  std::vector<double> times;
  for (const graph::Op& op : g.ops) times.push_back(*op.time_s);
  if (o.policy == Policy::None) {
    // Its small tensors need their segments, as the planner's budget counts them (audit 40a #2).
    // Exactly what the step maps (the larger tensors and the segments in use at the same op),
    // not footprint + small_reserve, which adds two peaks that fall at different ops.
    SPILL_EXPECTS(unswapped_peak <= mappable,
                  "policy none cannot run '" + p.name + "' " +
                      in_budget(budget, mappable, dev.granularity(), unswapped_peak - footprint) +
                      ": its step maps " + format_bytes(unswapped_peak) +
                      " with nothing swapped (its tensors at their peak, " +
                      format_bytes(footprint) + ", in the small pool's segments as the "
                      "allocator places them)");
    plan = graph::plan_none(g, po);
    pred = graph::simulate(g, times, link, nullptr, prediction_options());
    return;
  }
  graph::BudgetCheck check = graph::check_budget(g, po);
  if (!check.feasible)
    throw InvalidArgument("'" + p.name + "' cannot train " +
                          in_budget(budget, mappable, dev.granularity(), small_reserve) + ": " +
                          check.message);
  plan = graph::plan_spill(g, times, link, po);
  graph::check_plan(g, plan);  // remakes find what they read (the executor relies on it)
  maker.assign(g.tensors.size(), -1);
  for (const graph::Recompute& rc : plan.recomputes) maker[rc.tensor] = graph::remaking_op(g, rc.tensor);
  pred = graph::simulate(g, times, link, &plan, prediction_options());
  floor = graph::swap_floor(g, times, link, po.budget);
}

StepStats Executor::Impl::step() {
  StepStats r;
  r.step = steps_done;
  r.predicted_step_s = pred.step_time_s;
  r.predicted_stall_s = pred.stall_time_s;
  r.predicted_peak = pred.peak_bytes;
  const auto wall0 = Clock::now();
  spill_s = spill_cpu_s = spill_vmm_cpu_s = 0;
  const SwapStats before = swp ? swp->stats() : SwapStats{};
  const VmmCalls vmm0 = dev.vmm_calls();
  alloc.reset_peak();
  const AllocatorStats alloc0 = alloc.stats();
  // The step starts when the previous one's last op ended (the compute stream is idle), and
  // includes its inputs' upload.
  dev.record(t0, stream);
  at_op = -1;
  at_tensor = -1;
  if (swp) timed([&] { swp->begin_step(); });
  // Inputs: generated on the host, uploaded on the compute stream.
  for (std::size_t k = 0; k < inputs.size(); ++k) {
    const TensorId t = inputs[k];
    const std::size_t bytes = p.tensors[t].bytes;
    p.batch(steps_done, t, {static_cast<std::byte*>(staging[k]), bytes});
    allocate(t);
    pin(t);
    dev.copy_async(ptrs[t], staging[k], bytes, CopyKind::HostToDevice, stream);
    unpin(t, true);
  }
  dev.record(uploaded, stream);
  // The ops are timed in the second step: on a GPU the first pays every first use inside the
  // op that needs it (the cuBLAS and cuDNN handles and the workspace, the scratch buffer's
  // growth with its device synchronisation, the lazy loading of each kernel's module), while
  // the op's start event, recorded on an idle stream, has already completed.
  const bool measuring = o.measure_ops && steps_done == kMeasuredStep;
  const int steps_so_far = steps_done;
  OpContext ctx{*k, stream, steps_so_far + 1, ptrs};
  for (std::size_t i = 0; i < p.ops.size(); ++i) {
    at_op = std::ptrdiff_t(i);
    // Issue op i's plan actions when op i - lag has finished, as the plan times them; op -1
    // is the inputs' upload (it would otherwise race op 0's prefetches for the copy engine).
    // Without wait_every_op an op with no actions is issued at once (ExecOptions).
    const bool acts = o.policy == Policy::Graph && plan.steps[i].acts_before();
    if (*o.wait_every_op || acts) {
      if (i >= std::size_t(o.lag)) dev.synchronize(done[i - std::size_t(o.lag)]);
      else if (i + 1 == std::size_t(o.lag)) dev.synchronize(uploaded);
      if (i + 1 >= std::size_t(o.lag)) r.op_waits++;
    }
    if (o.policy == Policy::Graph) {
      for (graph::TensorIndex t : plan.steps[i].prefetch_at) {
        at_tensor = std::ptrdiff_t(t);
        timed([&] {
          const Residence where = swp->residence(ptrs[t]);
          if (where == Residence::SwappingOut) r.cancelled_bytes += g.tensors[t].bytes;
          // Without room, the cache goes first (the plan counts freed blocks gone at their
          // op), then the swap-outs the plan timed: Swapper::prefetch.
          swp->prefetch(ptrs[t], /*wait_for_room=*/true);
        });
      }
      at_tensor = -1;
    }
    if (o.policy == Policy::Graph)
      for (graph::TensorIndex t : plan.steps[i].recompute_before) remake(t, ctx, r);
    if (swp) timed([&] { swp->begin_op(p.ops[i].name); });
    for (TensorId t : allocs[i]) allocate(t);
    for (TensorId t : uses[i]) pin(t);
    if (o.poison)
      for (TensorId t : allocs[i]) k->fill(stream, static_cast<float*>(ptrs[t]), std::nanf(""), p.tensors[t].bytes / 4);
    if (o.measure_ops) dev.record(start[i], stream);
    p.ops[i].run(ctx);
    dev.record(done[i], stream);
    if (i == loss_op) {
      dev.record(loss_ready, stream);
      dev.wait(aux, loss_ready);
      // The read-back is a use on aux, which the later ops' frees and evictions on the compute
      // stream must wait for: before, with the host ops ahead (lag > 1), the loss's block could
      // be swapped out and unmapped (or reused) before aux copied it (a simulated
      // cudaErrorIllegalAddress with swap_threshold:0; a small-pool loss reused meanwhile
      // would have read another tensor's bytes).
      alloc.record_stream(ptrs[p.loss], aux);
      if (swappable[p.loss]) timed([&] { swp->record_stream(ptrs[p.loss], aux); });
      dev.copy_async(loss_host, ptrs[p.loss], sizeof(float), CopyKind::DeviceToHost, aux);
    }
    for (std::size_t u = 0; u < uses[i].size(); ++u) unpin(uses[i][u], wrote[i][u] != 0);
    for (TensorId t : frees[i]) free(t);
    if (o.policy == Policy::Graph) {
      for (graph::TensorIndex t : plan.steps[i].evict_after) {
        at_tensor = std::ptrdiff_t(t);
        timed([&] { swp->evict(ptrs[t]); });
      }
      at_tensor = -1;
      for (graph::TensorIndex t : plan.steps[i].drop_after) free(t);
    }
  }
  at_op = -2;
  dev.record(t1, stream);
  if (swp) timed([&] { swp->end_step(); });
  dev.synchronize(stream);
  dev.synchronize(aux);
  r.loss = *loss_host;
  r.step_s = dev.elapsed_ms(t0, t1) * 1e-3;
  for (const graph::Op& op : g.ops) r.compute_s += *op.time_s;
  for (const graph::Recompute& rc : plan.recomputes)
    if (o.policy == Policy::Graph) r.compute_s += *g.ops[std::size_t(maker[rc.tensor])].time_s;
  r.stall_s = std::max(0.0, r.step_s - r.compute_s);
  const AllocatorStats ops_done = alloc.stats();
  r.peak_mapped = static_cast<std::uint64_t>(ops_done.reserved.peak);
  r.plain_frees = ops_done.plain_frees - alloc0.plain_frees;
  ++steps_done;
  if (o.measure_ops) {
    std::vector<double> times;
    for (std::size_t i = 0; i < p.ops.size(); ++i)
      times.push_back(dev.elapsed_ms(start[i], done[i]) * 1e-3);
    r.ops_s = std::accumulate(times.begin(), times.end(), 0.0);
    r.op_start_s.reserve(p.ops.size());
    r.op_end_s.reserve(p.ops.size());
    for (std::size_t i = 0; i < p.ops.size(); ++i) {
      r.op_start_s.push_back(dev.elapsed_ms(t0, start[i]) * 1e-3);
      r.op_end_s.push_back(dev.elapsed_ms(t0, done[i]) * 1e-3);
    }
    if (measuring) make_plan(&times);
  }
  if (measuring) {
    if (o.policy == Policy::Graph)
      for (graph::TensorIndex t : plan.start_on_host) swp->evict(ptrs[t]);
  }
  // After the re-plan's evictions: they are this step's (they counted in no step before).
  if (swp) r.swaps = swaps_since(swp->stats(), before);
  r.spill_s = spill_s;
  r.spill_cpu_s = spill_cpu_s;
  r.spill_vmm_cpu_s = spill_vmm_cpu_s;
  r.vmm = dev.vmm_calls() - vmm0;
  const AllocatorStats alloc1 = alloc.stats();
  r.alloc_waits = alloc1.host_waits - alloc0.host_waits;
  r.alloc_wait_s = alloc1.host_wait_s - alloc0.host_wait_s;
  r.cache_takeovers = alloc1.cache_takeovers - alloc0.cache_takeovers;
  r.wall_s = seconds_since(wall0);
  return r;
}

std::vector<std::byte> Executor::Impl::read(TensorId t) {
  std::vector<std::byte> out(p.tensors[t].bytes);
  pin(t);
  dev.copy_async(out.data(), ptrs[t], out.size(), CopyKind::DeviceToHost, stream);
  unpin(t, false);
  dev.synchronize(stream);
  return out;
}

namespace {
// The error being handled again, of the same type, its message after `prefix`.
[[noreturn]] void rethrow_with(const std::string& prefix) {
  try {
    throw;
  } catch (const HostCapExceeded& e) {
    throw HostCapExceeded(prefix + e.what());
  } catch (const OutOfMemory& e) {
    throw OutOfMemory(prefix + e.what());
  } catch (const CudaError& e) {
    throw CudaError(prefix + e.what(), e.code());
  } catch (const InvalidArgument& e) {
    throw InvalidArgument(prefix + e.what());
  } catch (const WriteFailed& e) {
    throw WriteFailed(prefix + e.what());
  } catch (const Error& e) {
    throw Error(prefix + e.what());
  }
}
}  // namespace

Executor::Executor(Runtime& runtime, const Program& program, const ExecOptions& options)
    : impl_(std::make_unique<Impl>(runtime, program, options)) {
  impl_->setup();
}

Executor::~Executor() {
  Impl& m = *impl_;
  if (m.stream == nullptr) return;
  try {
    m.dev.synchronize(m.stream);
    for (std::size_t t = 0; t < m.ptrs.size(); ++t)
      if (m.ptrs[t]) m.alloc.deallocate(m.ptrs[t], m.stream);
    m.dev.synchronize(m.stream);
    m.alloc.forget_stream(m.stream);
    m.alloc.forget_stream(m.aux);
    m.dev.destroy_event(m.loss_ready);
    m.dev.destroy_event(m.uploaded);
    m.dev.destroy_stream(m.aux);
    for (Event e : m.done) m.dev.destroy_event(e);
    for (Event e : m.start) m.dev.destroy_event(e);
    m.dev.destroy_event(m.t0);
    m.dev.destroy_event(m.t1);
    for (void* h : m.staging) m.dev.free_host(h);
    if (m.loss_host) m.dev.free_host(m.loss_host);
    m.dev.destroy_stream(m.stream);
  } catch (const std::exception&) {
    // A device error is already on its way out as the run's exception.
  }
}

StepStats Executor::step() {
  try {
    return impl_->step();
  } catch (const Error&) {
    rethrow_with(impl_->where());
  }
}
const SwapStats& Executor::setup_swaps() const { return impl_->setup_swaps; }
const graph::Graph& Executor::graph() const { return impl_->g; }
const graph::Plan& Executor::plan() const { return impl_->plan; }
const graph::SimResult& Executor::prediction() const { return impl_->pred; }
std::uint64_t Executor::footprint() const { return impl_->footprint; }
std::uint64_t Executor::unswapped_peak() const { return impl_->unswapped_peak; }
std::uint64_t Executor::predicted_peak() const { return impl_->pred.peak_bytes; }
const std::optional<graph::SwapFloor>& Executor::floor() const { return impl_->floor; }
std::uint64_t Executor::budget() const { return impl_->budget; }
std::string Executor::kernels_name() const { return impl_->k->name(); }

std::vector<std::byte> Executor::state() {
  std::vector<std::byte> all;
  for (std::size_t t = 0; t < impl_->p.tensors.size(); ++t) {
    if (!graph::persistent(impl_->p.tensors[t].kind)) continue;
    std::vector<std::byte> one = impl_->read(TensorId(t));
    all.insert(all.end(), one.begin(), one.end());
  }
  return all;
}

std::vector<float> Executor::tensor(TensorId t) {
  SPILL_EXPECTS(t < impl_->p.tensors.size() && impl_->ptrs[t] != nullptr,
                "executor: tensor " + std::to_string(t) + " is not allocated now");
  std::vector<std::byte> b = impl_->read(t);
  std::vector<float> f(b.size() / 4);
  std::memcpy(f.data(), b.data(), f.size() * 4);
  return f;
}

}  // namespace spill::train
