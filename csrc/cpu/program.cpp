// A runtime graph as a straight-line program run in one native call (pyprune._C.Program).
//
// At batch 1 a compressed ResNet-56's layers take tens of microseconds each, and running
// them as a torch.fx GraphModule adds a Python module call, an argument parse and a dict
// lookup or two per node: about a third of the forward pass (bench/README.md, end to
// end). A Program holds the same computation as a list of steps over numbered value slots,
// built once from the graph (pyprune/runtime/program.py), and runs them without Python:
//   - sparse steps call the sparse kernels' tensor functions (sparse_bindings.h);
//   - op steps call an ATen operator through the dispatcher, with each argument a slot, a
//     list of slots or a constant fixed at build time (weights included).
// After each step the slots no later step reads are released, as the GraphModule's
// generated code does, so activations do not pile up.
#include <ATen/core/dispatch/Dispatcher.h>
#include <c10/core/InferenceMode.h>
#include <torch/python.h>

#include <memory>
#include <optional>
#include <stdexcept>
#include <string>
#include <utility>
#include <variant>
#include <vector>

#include "sparse_bindings.h"

namespace pyprune {
namespace {

namespace py = pybind11;
using Pair = std::pair<int64_t, int64_t>;

struct Step {
  int64_t out = 0;
  std::vector<int64_t> release;  // slots dead after this step
  virtual ~Step() = default;
  virtual at::Tensor run(std::vector<at::Tensor>& slots) const = 0;
};

// The weights and epilogue of a sparse step: the arguments of the kernels' tensor
// functions (sparse_bindings.h), checked by them on every call.
struct SparseStep : Step {
  int64_t input = 0;
  at::Tensor rowptr, colidx, values;
  std::optional<at::Tensor> bias, row_scale;
  bool relu = false;
  int64_t gap_bits = 0;
};

// A sparse convolution over the input slot, with an optional residual slot added before
// its ReLU (the runtime's fused residual adds).
struct SparseConvStep : SparseStep {
  int64_t residual = -1;
  Pair kernel_size, stride, padding, dilation;

  at::Tensor run(std::vector<at::Tensor>& slots) const override {
    std::optional<at::Tensor> res;
    if (residual >= 0) res = slots[residual];
    return sparse_conv2d(slots[input], rowptr, colidx, values, kernel_size, bias, stride, padding, dilation, relu,
                         "auto", "auto", gap_bits, row_scale, res);
  }
};

struct SparseLinearStep : SparseStep {
  at::Tensor run(std::vector<at::Tensor>& slots) const override {
    return sparse_linear(slots[input], rowptr, colidx, values, bias, relu, "auto", gap_bits, row_scale);
  }
};

// One argument of an operator: a slot, a list of slots (a Tensor[] argument) or a constant.
struct SlotArg {
  int64_t slot;
};
struct SlotListArg {
  std::vector<int64_t> slots;
};
using Arg = std::variant<SlotArg, SlotListArg, c10::IValue>;

struct OpStep : Step {
  c10::OperatorHandle op;
  std::vector<Arg> args;

  explicit OpStep(c10::OperatorHandle handle) : op(std::move(handle)) {}

  at::Tensor run(std::vector<at::Tensor>& slots) const override {
    torch::jit::Stack stack;
    stack.reserve(args.size());
    for (const Arg& a : args) {
      if (const auto* s = std::get_if<SlotArg>(&a)) {
        stack.emplace_back(slots[s->slot]);
      } else if (const auto* l = std::get_if<SlotListArg>(&a)) {
        std::vector<at::Tensor> list;
        list.reserve(l->slots.size());
        for (const int64_t i : l->slots) list.push_back(slots[i]);
        stack.emplace_back(std::move(list));
      } else {
        stack.push_back(std::get<c10::IValue>(a));
      }
    }
    op.callBoxed(&stack);
    return stack.at(0).toTensor();
  }
};

// A constant from Python: None, bool, int, float, str, a tensor, or a list/tuple of ints.
c10::IValue constant(const py::handle& value) {
  if (value.is_none()) return {};
  if (py::isinstance<py::bool_>(value)) return value.cast<bool>();
  if (py::isinstance<py::int_>(value)) return value.cast<int64_t>();
  if (py::isinstance<py::float_>(value)) return value.cast<double>();
  if (py::isinstance<py::str>(value)) return value.cast<std::string>();
  if (THPVariable_Check(value.ptr())) return THPVariable_Unpack(value.ptr());
  if (py::isinstance<py::list>(value) || py::isinstance<py::tuple>(value)) {
    std::vector<int64_t> ints;
    for (const py::handle item : value) {
      if (!py::isinstance<py::int_>(item) || py::isinstance<py::bool_>(item))
        throw std::invalid_argument("Program: a constant list may hold ints only, got " + py::repr(value).cast<std::string>());
      ints.push_back(item.cast<int64_t>());
    }
    return ints;
  }
  throw std::invalid_argument("Program: unsupported constant " + py::repr(value).cast<std::string>());
}

class Program {
 public:
  Program(int64_t slots, int64_t input) : slots_(slots), input_(input) { check_slot(input); }

  // An ATen operator by schema name and overload ("" for none). Each argument is an int
  // slot wrapped as ("slot", i), a list ("slots", [i, ...]) or ("const", value); arguments
  // past those given take the schema's defaults.
  void add_op(const std::string& name, const std::string& overload, const py::list& args, int64_t out,
              const std::vector<int64_t>& release) {
    const std::optional<c10::OperatorHandle> handle = c10::Dispatcher::singleton().findSchema({name, overload});
    if (!handle) throw std::invalid_argument("Program: no operator " + name + (overload.empty() ? "" : "." + overload));
    const c10::FunctionSchema& schema = handle->schema();
    const auto& formal = schema.arguments();
    if (args.size() > formal.size())
      throw std::invalid_argument("Program: " + schema.name() + " takes " + std::to_string(formal.size()) +
                                  " arguments, got " + std::to_string(args.size()));
    if (schema.returns().size() != 1 || schema.returns()[0].type()->kind() != c10::TypeKind::TensorType)
      throw std::invalid_argument("Program: " + schema.name() + " does not return one tensor");
    auto step = std::make_unique<OpStep>(*handle);
    for (const py::handle a : args) {
      const auto pair = a.cast<std::pair<std::string, py::object>>();
      if (pair.first == "slot") {
        step->args.emplace_back(SlotArg{checked(pair.second.cast<int64_t>())});
      } else if (pair.first == "slots") {
        SlotListArg list{pair.second.cast<std::vector<int64_t>>()};
        for (const int64_t s : list.slots) check_slot(s);
        step->args.emplace_back(std::move(list));
      } else if (pair.first == "const") {
        step->args.emplace_back(constant(pair.second));
      } else {
        throw std::invalid_argument("Program: an argument is ('slot', i), ('slots', [...]) or ('const', v), got " +
                                    pair.first);
      }
    }
    for (size_t i = args.size(); i < formal.size(); ++i) {
      if (!formal[i].default_value())
        throw std::invalid_argument("Program: " + schema.name() + " needs its argument " + formal[i].name());
      step->args.emplace_back(*formal[i].default_value());
    }
    push(std::move(step), out, release);
  }

  void add_sparse_conv(int64_t input, const at::Tensor& rowptr, const at::Tensor& colidx, const at::Tensor& values,
                       Pair kernel_size, const std::optional<at::Tensor>& bias, Pair stride, Pair padding,
                       Pair dilation, bool relu, int64_t gap_bits, const std::optional<at::Tensor>& row_scale,
                       int64_t residual, int64_t out, const std::vector<int64_t>& release) {
    auto step = std::make_unique<SparseConvStep>();
    weights(*step, input, rowptr, colidx, values, bias, relu, gap_bits, row_scale);
    step->residual = residual < 0 ? -1 : checked(residual);
    step->kernel_size = kernel_size;
    step->stride = stride;
    step->padding = padding;
    step->dilation = dilation;
    push(std::move(step), out, release);
  }

  void add_sparse_linear(int64_t input, const at::Tensor& rowptr, const at::Tensor& colidx, const at::Tensor& values,
                         const std::optional<at::Tensor>& bias, bool relu, int64_t gap_bits,
                         const std::optional<at::Tensor>& row_scale, int64_t out, const std::vector<int64_t>& release) {
    auto step = std::make_unique<SparseLinearStep>();
    weights(*step, input, rowptr, colidx, values, bias, relu, gap_bits, row_scale);
    push(std::move(step), out, release);
  }

  void set_output(int64_t slot) { output_ = checked(slot); }

  at::Tensor run(const at::Tensor& x) const {
    if (output_ < 0) throw std::invalid_argument("Program: no output set");
    std::vector<at::Tensor> slots(static_cast<size_t>(slots_));
    slots[input_] = x;
    py::gil_scoped_release nogil;
    c10::InferenceMode inference;
    for (const auto& step : steps_) {
      slots[step->out] = step->run(slots);
      for (const int64_t s : step->release) slots[s].reset();
    }
    return slots[output_];
  }

  int64_t size() const { return static_cast<int64_t>(steps_.size()); }

 private:
  void check_slot(int64_t s) const {
    if (s < 0 || s >= slots_)
      throw std::invalid_argument("Program: slot " + std::to_string(s) + " outside [0, " + std::to_string(slots_) + ")");
  }
  int64_t checked(int64_t s) const {
    check_slot(s);
    return s;
  }
  void weights(SparseStep& step, int64_t input, const at::Tensor& rowptr, const at::Tensor& colidx,
               const at::Tensor& values, const std::optional<at::Tensor>& bias, bool relu, int64_t gap_bits,
               const std::optional<at::Tensor>& row_scale) const {
    step.input = checked(input);
    step.rowptr = rowptr;
    step.colidx = colidx;
    step.values = values;
    step.bias = bias;
    step.relu = relu;
    step.gap_bits = gap_bits;
    step.row_scale = row_scale;
  }
  void push(std::unique_ptr<Step> step, int64_t out, const std::vector<int64_t>& release) {
    step->out = checked(out);
    for (const int64_t s : release) check_slot(s);
    step->release = release;
    steps_.push_back(std::move(step));
  }

  int64_t slots_, input_, output_ = -1;
  std::vector<std::unique_ptr<Step>> steps_;
};

}  // namespace

void register_program(pybind11::module_& m) {
  py::class_<Program>(m, "Program",
                      "A runtime graph as steps over numbered value slots, run in one native call "
                      "(csrc/cpu/program.cpp; built by pyprune/runtime/program.py).")
      .def(py::init<int64_t, int64_t>(), py::arg("slots"), py::arg("input"))
      .def("add_op", &Program::add_op, py::arg("name"), py::arg("overload"), py::arg("args"), py::arg("out"),
           py::arg("release"))
      .def("add_sparse_conv", &Program::add_sparse_conv, py::arg("input"), py::arg("rowptr"), py::arg("colidx"),
           py::arg("values"), py::arg("kernel_size"), py::arg("bias"), py::arg("stride"), py::arg("padding"),
           py::arg("dilation"), py::arg("relu"), py::arg("gap_bits"), py::arg("row_scale"), py::arg("residual"),
           py::arg("out"), py::arg("release"))
      .def("add_sparse_linear", &Program::add_sparse_linear, py::arg("input"), py::arg("rowptr"), py::arg("colidx"),
           py::arg("values"), py::arg("bias"), py::arg("relu"), py::arg("gap_bits"), py::arg("row_scale"),
           py::arg("out"), py::arg("release"))
      .def("set_output", &Program::set_output, py::arg("slot"))
      .def("run", &Program::run, py::arg("input"))
      .def("__len__", &Program::size);
}

}  // namespace pyprune
